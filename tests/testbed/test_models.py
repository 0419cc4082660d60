import torch

from memguard.models import TinyPipelineConfig, build_sd15_unet, build_tiny_pipeline


def test_tiny_pipeline_generates_from_random_weights():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle on a blue plain background"], num_inference_steps=2, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert TinyPipelineConfig().latent_size == 16


def test_sd15_unet_has_the_real_architecture():
    with torch.device("meta"):
        unet = build_sd15_unet()
    cfg = unet.config
    assert tuple(cfg.block_out_channels) == (320, 640, 1280, 1280)
    assert cfg.cross_attention_dim == 768
    heads = {m.heads for n, m in unet.named_modules() if n.endswith("attn2")}
    head_dims = {m.inner_dim // m.heads for n, m in unet.named_modules() if n.endswith("attn2")}
    assert heads == {8} and head_dims == {40, 80, 160}
    assert 850e6 < sum(p.numel() for p in unet.parameters()) < 870e6
