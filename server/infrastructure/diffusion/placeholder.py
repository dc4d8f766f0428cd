"""The embedded placeholder model: a tiny random-weight SD1.5 pipeline the server builds when
no model is configured (and its SDXL sibling, which tests build the same way), in well under a
second, saved in diffusers format. Nothing is downloaded: the tokenizer is a byte-level
vocabulary written here. Their images are noise; they exist so that the real loading and
generation code runs on machines without model files or a GPU. Production code, not a dev
tool: a server with no model configured depends on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLACEHOLDER_NOTE = "random weights: images are noise"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab.setdefault(char + suffix, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def _text_config(vocab_size: int, hidden: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def build_tiny_sd15(folder: Path, *, seed: int = 0, inpainting: bool = False) -> Path:
    """`inpainting`: a dedicated inpainting model, its UNet taking 9 channels (latents, mask,
    masked image), saved as a StableDiffusionInpaintPipeline as such models are."""
    import torch
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tokenizer_src")
    pipeline = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 32)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=16,
            in_channels=9 if inpainting else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl(folder: Path, *, seed: int = 0, inpainting: bool = False) -> Path:
    import torch
    from diffusers import (
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tokenizer_src")
    pipeline = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
    pipe = pipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), 32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=16,
            in_channels=9 if inpainting else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            norm_num_groups=32,
        ),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_controlnet(folder: Path, base: Path, *, seed: int = 0) -> Path:
    """A random-weight ControlNet for the tiny model in `base` (SD1 or SDXL), in diffusers'
    layout. Built from the base UNet as diffusers does for training, but with its zero
    convolutions randomised too: a fresh ControlNet adds nothing, and tests must see it steer.
    The control encoder downsamples as often as the tiny VAE (2x), so latents line up."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.5)
            conv.bias.normal_(0.0, 0.1)
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0.0, 0.2)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_flux_controlnet(folder: Path, base: Path, *, seed: int = 0) -> Path:
    """A random-weight FLUX ControlNet (InstantX layout) for the tiny FLUX model in `base`,
    in diffusers' layout: one double- and one single-stream block copied from its transformer,
    with the zero-initialised projections (the control image's embedder, each block's
    output) randomised so that tests see it steer."""
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )
    with torch.no_grad():
        outputs = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]
        for linear in [*outputs, controlnet.controlnet_x_embedder]:
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    controlnet.save_pretrained(folder, safe_serialization=True)
    # from_transformer keeps the transformer's `out_channels`, which the class does not take
    # (diffusers warns on every load): dropped, as in published FLUX ControlNets.
    config = json.loads((folder / "config.json").read_text())
    config.pop("out_channels", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _randomise(*linears: Any) -> None:
    """The zero-initialised projections of a fresh ControlNet made random: a tiny one's
    control image then steers from the first step."""
    import torch

    with torch.no_grad():
        for linear in linears:
            linear.weight.normal_(0.0, 0.5)
            if linear.bias is not None:
                linear.bias.normal_(0.0, 0.1)


def build_tiny_sd3_controlnet(
    folder: Path, base: Path, *, seed: int = 0, text_width: int | None = None
) -> Path:
    """A random-weight SD3 ControlNet (InstantX layout: its own blocks over the text
    embedding, no pooled projection) with one block, for the tiny SD3 model in `base`, in
    diffusers' layout; `text_width`: another T5 width than the model's (a ControlNet made for
    another base model)."""
    import inspect

    import torch
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    config = json.loads((base / "transformer" / "config.json").read_text())
    keys = inspect.signature(SD3ControlNetModel.__init__).parameters
    given = {k: v for k, v in config.items() if k in keys}
    given |= {"num_layers": 1, "extra_conditioning_channels": 0}
    if text_width is not None:
        given["joint_attention_dim"] = text_width
    controlnet = SD3ControlNetModel(**given)
    _randomise(*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_qwen_image_controlnet(folder: Path, base: Path, *, seed: int = 0) -> Path:
    """A random-weight Qwen-Image ControlNet (InstantX layout) with one block, for the tiny
    Qwen-Image model in `base`, in diffusers' layout."""
    import torch
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel.from_pretrained(base / "transformer")
    controlnet = QwenImageControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )
    _randomise(*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_z_image_controlnet(folder: Path, base: Path, *, seed: int = 0) -> Path:
    """A random-weight Z-Image ControlNet (Alibaba PAI's Union 1.0 layout: control blocks
    steering the transformer's layers, its own noise refiner; the embedders are the
    transformer's, shared when the pipeline is made) for the tiny Z-Image model in `base`,
    in diffusers' layout."""
    import torch
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    config = json.loads((base / "transformer" / "config.json").read_text())
    controlnet = ZImageControlNetModel(
        control_layers_places=list(range(config["n_layers"])),
        control_in_dim=config["in_channels"],
        all_patch_size=tuple(config["all_patch_size"]),
        all_f_patch_size=tuple(config["all_f_patch_size"]),
        dim=config["dim"],
        n_refiner_layers=config["n_refiner_layers"],
        n_heads=config["n_heads"],
        n_kv_heads=config["n_kv_heads"],
        norm_eps=config["norm_eps"],
        qk_norm=config["qk_norm"],
    )
    blocks = controlnet.control_layers
    _randomise(blocks[0].before_proj, *(block.after_proj for block in blocks))
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def _t5_tokenizer() -> Any:
    """A T5-style Unigram tokenizer (`<pad>` 0, `</s>` 1, `<unk>` 2) over printable ASCII, each
    character alone or starting a word (SentencePiece's `▁`), built in memory: no sentencepiece
    model file and no sentinel tokens. `T5TokenizerFast` is this class in transformers 5."""
    from transformers import T5Tokenizer

    chars = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + char, -3.0) for char in chars] + [(char, -4.0) for char in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _vae16(scaling_factor: float, shift_factor: float) -> Any:
    """A 16-channel latent space (FLUX, SD3) with the family's scaling and shift; two blocks,
    so the VAE downsamples 2x (pipelines that pack 2x2 patches take multiples of 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _t5_encoder(vocab_size: int, width: int) -> Any:
    """A one-layer T5 v1.1-style encoder (gated GELU), `<pad>` 0 and `</s>` 1 as in
    `_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_tiny_flux(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight FLUX.1-dev-style pipeline (guidance-distilled transformer, CLIP
    pooled text plus T5 sequence text, 16-channel VAE, dynamically shifted flow matching)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tokenizer_src")
    tokenizer_2 = _t5_tokenizer()
    t5_width, clip_width = 32, 32
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), clip_width)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(tokenizer_2), t5_width),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            pooled_projection_dim=clip_width,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3(folder: Path, *, seed: int = 0, t5: bool = True) -> Path:
    """A tiny random-weight SD3.5-style pipeline: an MMDiT transformer on 16-channel latents
    in 2x2 patches, two CLIP text encoders with projections (their pooled outputs joined) and
    a T5 (the sequence; `t5=False` leaves it out, as SD3 allows), flow matching with a fixed
    shift."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tokenizer_src")
    t5_tokenizer = _t5_tokenizer()
    clip_width, t5_width = 32, 32

    def clip() -> Any:
        config = _text_config(len(tokenizer), clip_width)
        config.projection_dim = clip_width
        return CLIPTextModelWithProjection(config)

    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae16(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip(),
        tokenizer=tokenizer,
        text_encoder_2=clip(),
        tokenizer_2=tokenizer,
        text_encoder_3=None if not t5 else _t5_encoder(len(t5_tokenizer), t5_width),
        tokenizer_3=t5_tokenizer if t5 else None,
        transformer=SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            caption_projection_dim=32,
            pooled_projection_dim=2 * clip_width,
            out_channels=16,
            pos_embed_max_size=32,
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _qwen_tokenizer() -> Any:
    """A Qwen2-style byte-level BPE tokenizer over the 256 byte symbols (no merges), with the
    chat markers Qwen's prompt templates use and a chat template like Qwen3's, built in
    memory: Qwen-Image formats its template itself, Z-Image asks the tokenizer for it."""
    from transformers import Qwen2Tokenizer

    vocab = {char: index for index, char in enumerate(_bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def build_tiny_qwen_image(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight Qwen-Image pipeline: an MMDiT on 16-channel latents of a Wan-style
    video VAE (one frame) packed in 2x2 patches, a two-layer Qwen2.5-VL text encoder (its
    vision tower too, as the real one has), dynamically shifted flow matching."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    vocab, width = len(tokenizer), 16
    # Vision token ids past the vocabulary: prompts never contain them.
    vision = {
        f"{name}_token_id": vocab + offset
        for offset, name in enumerate(("vision_start", "vision_end", "vision", "image", "video"))
    }
    text_config = {
        "hidden_size": width,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "vocab_size": vocab,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": width,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, vocab_size=vocab, **vision
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=0.9,
            base_image_seq_len=256,
            max_image_seq_len=8192,
            time_shift_type="exponential",
        ),
        vae=AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 16,
            latents_std=[1.0] * 16,
        ),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=width,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_z_image(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight Z-Image pipeline: a single-stream DiT with noise and context
    refiners on FLUX-style 16-channel latents, a two-layer Qwen3 text encoder read through
    its chat template, flow matching with a fixed shift (Turbo's)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    width = 16
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=Qwen3Model(
            Qwen3Config(
                hidden_size=width,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                vocab_size=len(tokenizer),
                max_position_embeddings=1024,
                bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ),
        tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=width,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[256, 32, 32],
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
