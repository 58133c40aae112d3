"""The EquiAV pretraining model: two towers, per-view final norms, predictors, four heads.

Per modality m (a = audio, v = visual):
  clean tokens = norm_m(tower_m(clean view)),  augmented tokens = norm_m_aug(tower_m(aug view))
  z_equi_m = head_m_intra(predictor_m(clean tokens, aug_encoder_m(t_m)))
  z_aug_m  = head_m_intra(mean of augmented tokens)
  z_inv_m  = head_m_inter(predictor_m(clean tokens, aug_encoder_m(t_m_cen)))   with cen_mean
           = head_m_inter(mean of clean tokens)                                without

Speed: the clean and augmented views share one tower pass (concatenated along the batch: one
large matmul per layer instead of two), and the applied t and the `cen_num` sampled vectors
share one encoder call, one key/value projection and one attention call in the predictor (each
query token is independent until its group's mean, so the results are those of separate calls).
"""

from __future__ import annotations

import torch
from torch import nn

from equiav.config import DataConfig, ModelConfig
from equiav.model.heads import ProjectionHead
from equiav.model.params import init_weights_
from equiav.model.predictor import AugmentationEncoder, TransformationPredictor
from equiav.model.vit import ViTTower, build_audio_tower, build_visual_tower


def _check_vectors(name: str, t: torch.Tensor, batch: int, size: int, ndim: int) -> None:
    want = f"(B, {size})" if ndim == 2 else f"(B, n, {size})"
    if t.dim() != ndim or t.shape[0] != batch or t.shape[-1] != size or t.shape[1] == 0:
        raise ValueError(f"{name}: expected {want} with B = {batch}, got {tuple(t.shape)}")


class EquiAVPretrain(nn.Module):
    """EquiAV for pretraining and zero-shot retrieval (spec: 'Model (pretraining)')."""

    def __init__(self, model: ModelConfig, data: DataConfig) -> None:
        super().__init__()
        self.cen_mean = model.cen_mean
        self.aug_size_a = model.aug_size_a
        self.aug_size_v = model.aug_size_v
        d = model.embed_dim

        self.tower_a = build_audio_tower(model, data)
        self.tower_v = build_visual_tower(model, data)
        self.norm_a = nn.LayerNorm(d)
        self.norm_a_aug = nn.LayerNorm(d)
        self.norm_v = nn.LayerNorm(d)
        self.norm_v_aug = nn.LayerNorm(d)

        self.aug_encoder_a = AugmentationEncoder(model.aug_size_a, model.aug_hidden)
        self.aug_encoder_v = AugmentationEncoder(model.aug_size_v, model.aug_hidden)

        def predictor() -> TransformationPredictor:
            return TransformationPredictor(
                d,
                model.aug_hidden,
                num_heads=model.predictor_heads,
                head_dim=model.predictor_head_dim,
                mlp_ratio=model.mlp_ratio,
            )

        self.predictor_a = predictor()
        self.predictor_v = predictor()

        def head() -> ProjectionHead:
            return ProjectionHead(d, model.head_hidden, model.head_out)

        self.head_a_intra = head()
        self.head_a_inter = head()
        self.head_v_intra = head()
        self.head_v_inter = head()

        init_weights_(self)

    # ---- towers ---------------------------------------------------------------------------

    @staticmethod
    def encode_pair(
        tower: ViTTower,
        norm: nn.LayerNorm,
        norm_aug: nn.LayerNorm,
        clean: torch.Tensor,
        aug: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and augmented views through one tower pass -> (clean tokens, aug tokens), each
        after its own final norm."""
        if clean.shape != aug.shape:
            raise ValueError(
                f"{tower.name}: clean view {tuple(clean.shape)} and augmented view "
                f"{tuple(aug.shape)} differ in shape"
            )
        tokens_clean, tokens_aug = tower(torch.cat([clean, aug])).chunk(2)
        return norm(tokens_clean), norm_aug(tokens_aug)

    # ---- heads ----------------------------------------------------------------------------

    def _project(
        self,
        tokens: torch.Tensor,
        tokens_aug: torch.Tensor,
        t: torch.Tensor,
        t_cen: torch.Tensor | None,
        encoder: AugmentationEncoder,
        predictor: TransformationPredictor,
        head_intra: ProjectionHead,
        head_inter: ProjectionHead,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (z_inv, z_equi, z_aug) of one modality."""
        queries = t[:, None] if t_cen is None else torch.cat([t[:, None], t_cen.to(t.dtype)], 1)
        per_query = predictor.forward_tokens(tokens, encoder(queries))
        z_equi = head_intra(per_query[:, 0])
        if t_cen is None:
            z_inv = head_inter(tokens.mean(dim=1))
        else:
            z_inv = head_inter(per_query[:, 1:].mean(dim=1))
        z_aug = head_intra(tokens_aug.mean(dim=1))
        return z_inv, z_equi, z_aug

    def _cen_vectors(
        self, t_cen: torch.Tensor | None, name: str, batch: int, size: int
    ) -> torch.Tensor | None:
        if not self.cen_mean:
            return None
        if t_cen is None:
            raise ValueError(f"model.cen_mean is on: {name} (B, cen_num, {size}) is required")
        _check_vectors(name, t_cen, batch, size, ndim=3)
        return t_cen

    def forward(
        self,
        audio: torch.Tensor,
        visual: torch.Tensor,
        audio_aug: torch.Tensor,
        visual_aug: torch.Tensor,
        t_a: torch.Tensor,
        t_v: torch.Tensor,
        t_a_cen: torch.Tensor | None = None,
        t_v_cen: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Views (B, 3, F, T) audio and (B, 3, H, W) visual, t_a (B, 24), t_v (B, 18), and with
        cen_mean t_a_cen (B, cen_num, 24), t_v_cen (B, cen_num, 18) (ignored without cen_mean).

        Returns z_inv_a, z_inv_v, z_equi_a, z_equi_v, z_aug_a, z_aug_v, each (B, head_out), not
        L2-normalised.
        """
        batch = audio.shape[0]
        _check_vectors("t_a", t_a, batch, self.aug_size_a, ndim=2)
        _check_vectors("t_v", t_v, batch, self.aug_size_v, ndim=2)
        t_a_cen = self._cen_vectors(t_a_cen, "t_a_cen", batch, self.aug_size_a)
        t_v_cen = self._cen_vectors(t_v_cen, "t_v_cen", batch, self.aug_size_v)

        a, a_aug = self.encode_pair(self.tower_a, self.norm_a, self.norm_a_aug, audio, audio_aug)
        v, v_aug = self.encode_pair(self.tower_v, self.norm_v, self.norm_v_aug, visual, visual_aug)
        z_inv_a, z_equi_a, z_aug_a = self._project(
            a,
            a_aug,
            t_a,
            t_a_cen,
            self.aug_encoder_a,
            self.predictor_a,
            self.head_a_intra,
            self.head_a_inter,
        )
        z_inv_v, z_equi_v, z_aug_v = self._project(
            v,
            v_aug,
            t_v,
            t_v_cen,
            self.aug_encoder_v,
            self.predictor_v,
            self.head_v_intra,
            self.head_v_inter,
        )
        return {
            "z_inv_a": z_inv_a,
            "z_inv_v": z_inv_v,
            "z_equi_a": z_equi_a,
            "z_equi_v": z_equi_v,
            "z_aug_a": z_aug_a,
            "z_aug_v": z_aug_v,
        }

    def embed(
        self,
        audio: torch.Tensor,
        visual: torch.Tensor,
        t_a_cen: torch.Tensor | None = None,
        t_v_cen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval embeddings (z_inv_a, z_inv_v) of clean views, as in pretraining: with cen_mean
        the inter head of the predictor's output for the sampled vectors t_*_cen (required),
        otherwise of the mean-pooled tokens. Not L2-normalised."""
        batch = audio.shape[0]
        t_a_cen = self._cen_vectors(t_a_cen, "t_a_cen", batch, self.aug_size_a)
        t_v_cen = self._cen_vectors(t_v_cen, "t_v_cen", batch, self.aug_size_v)
        a = self.norm_a(self.tower_a(audio))
        v = self.norm_v(self.tower_v(visual))
        if t_a_cen is None:
            return self.head_a_inter(a.mean(dim=1)), self.head_v_inter(v.mean(dim=1))
        pa = self.predictor_a(a, self.aug_encoder_a(t_a_cen))
        pv = self.predictor_v(v, self.aug_encoder_v(t_v_cen))
        return self.head_a_inter(pa), self.head_v_inter(pv)
