"""fedhello: federated LoRA fine-tuning with heterogeneous LoRA allocation (Fed-HeLLo)."""

__version__ = "0.1.0"
