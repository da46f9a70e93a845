"""moelab: mixture-of-experts LoRA methods compared under one Hydra + Lightning trainer."""

__version__ = "0.1.0"
