"""The Flower shell, the only place that imports `flwr`: the ServerApp and its strategies,
the ClientApp, what travels on the wire, screening of updates, SecAgg+, the simulation
engine and test credentials for a deployment."""
