"""A saved adaptive-depth model's folder: the names of its files and the code that writes, reads and checks each one
(:mod:`.files`), its model card (:mod:`.card`), and a save that is complete or invisible across them (:mod:`.atomic`).
"""

from .atomic import is_staging, recover_interrupted_saves, replace_files_atomically
from .card import CARD_MARKER, build_model_card, is_ours
from .files import (
    CARD_NAME,
    CONFIG_NAME,
    NORMS_NAME,
    OPTIONAL_FILES,
    PLOT_NAME,
    PROCESSOR_NAME,
    SAVE_ID_KEY,
    STRUCTURE_KEY,
    WEIGHTS_NAME,
    SavedModel,
    read_files,
    read_safetensors,
    write_files,
)

__all__ = [
    "CARD_MARKER", "CARD_NAME", "CONFIG_NAME", "NORMS_NAME", "OPTIONAL_FILES", "PLOT_NAME", "PROCESSOR_NAME",
    "SAVE_ID_KEY", "STRUCTURE_KEY", "WEIGHTS_NAME", "SavedModel", "build_model_card", "is_ours", "is_staging",
    "read_files", "read_safetensors", "recover_interrupted_saves", "replace_files_atomically", "write_files",
]  # fmt: skip
