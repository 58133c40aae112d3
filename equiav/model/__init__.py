"""EquiAV models: ViT towers, transformation predictor, projection heads, and checkpoint maps.

- `vit`: `ViTTower` (timm PatchEmbed + Blocks over SDPA, fixed 2-D sin-cos positions, modality
  vector; returns tokens before the final norm) and its builders from the config.
- `predictor`: `AugmentationEncoder` (t -> 256) and `TransformationPredictor` (cross-attention of
  encoded t over the clean tokens).
- `heads`: `ProjectionHead` (the intra / inter MLPs).
- `pretrain`: `EquiAVPretrain` (forward -> z_inv / z_equi / z_aug per modality; `embed` for
  retrieval).
- `finetune`: `EquiAVFinetune` (ftmode heads, `new_parameters`, `load_pretrained`).
- `keymap`: MAE encoder loading and the released-checkpoint key map, with `LoadReport`s.
- `params`: `init_weights_` and `count_parameters`.
"""

from equiav.model.finetune import FTMODES, EquiAVFinetune
from equiav.model.heads import ProjectionHead
from equiav.model.keymap import (
    CheckpointError,
    LoadReport,
    load_mae_encoder,
    load_mae_encoders,
    load_pretrain_checkpoint,
    load_released_checkpoint,
    read_state_dict,
)
from equiav.model.params import count_parameters, init_weights_
from equiav.model.predictor import AugmentationEncoder, QuickGELU, TransformationPredictor
from equiav.model.pretrain import EquiAVPretrain
from equiav.model.vit import (
    ViTTower,
    build_audio_tower,
    build_visual_tower,
    sincos_pos_embed_2d,
)

__all__ = [
    "FTMODES",
    "AugmentationEncoder",
    "CheckpointError",
    "EquiAVFinetune",
    "EquiAVPretrain",
    "LoadReport",
    "ProjectionHead",
    "QuickGELU",
    "TransformationPredictor",
    "ViTTower",
    "build_audio_tower",
    "build_visual_tower",
    "count_parameters",
    "init_weights_",
    "load_mae_encoder",
    "load_mae_encoders",
    "load_pretrain_checkpoint",
    "load_released_checkpoint",
    "read_state_dict",
    "sincos_pos_embed_2d",
]
