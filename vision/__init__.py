"""unirep's image backend: DiT/SiT, frozen ViT teachers, image/latent data, the REPA family of recipes.

- ``vision.models``: :class:`~vision.models.sit.SiT` (DiT/SiT with adaLN-Zero) and presets ``SiT-S/B/L/XL/{1,2,4,8}``;
- ``vision.encoders``: :class:`~vision.encoders.TimmViTEncoder` (DINOv2 with/without registers, MAE, SigLIP, the
  self-trained digits ViT) implementing :class:`unirep.encoders.Encoder`;
- ``vision.teacher``: the self-trained digits teacher (MAE), trained on first use;
- ``vision.data``: digits, scikit-image crops, image folders, latent folders;
- ``vision.task``: :class:`~vision.task.VisionFlowTask` (sit, repa, reg, haste, sra, layersync, dispersive);
- ``vision.tokenizers``: RAE and VA-VAE.

See docs/vision.md. This package depends on ``unirep``, never the reverse.
"""
