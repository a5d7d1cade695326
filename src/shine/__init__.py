"""shine: MARS, CAME and Cautious optimizers for PyTorch."""
from .optimizers import CAME, MARS, AdamW, Lion
from .registry import create_optimizer, list_optimizers, optimizer_state_bytes
from .wrapper import Cautious

__all__ = ["AdamW", "Lion", "MARS", "CAME", "Cautious", "create_optimizer", "list_optimizers",
           "optimizer_state_bytes"]
__version__ = "0.1.0"
