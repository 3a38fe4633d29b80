"""The algorithm, Flower-free: one round of FedCoLLM (`round.py`), the client update
(`client.py`), the server's aggregation and mutual distillation (`server.py`,
`aggregation.py`, `distillation.py`) and the training loop they share (`training.py`).

Nothing is re-exported here, so that a client process imports the client side only."""
