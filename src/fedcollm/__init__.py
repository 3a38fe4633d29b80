"""fedcollm: federated co-tuning of a server LLM and client SLMs (FedCoLLM) on Flower."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and bitsandbytes then warns that an
# optional CPU kernel package (fetched from the hub, which fedcollm does not use) is absent.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
