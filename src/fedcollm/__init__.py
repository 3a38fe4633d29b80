"""fedcollm: federated co-tuning of a server LLM and client SLMs (FedCoLLM) on Flower."""

__version__ = "0.1.0"
