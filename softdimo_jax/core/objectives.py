"""The training objectives of the models Soft-Di[M]O starts from, as (init_fn, step_fn)
pairs of the Trainer contract (softdimo_jax.runtime.trainer).

Tokenizer: MaskBit's lookup-free ConvVQModel with reconstruction + LFQ losses,

    loss = recon (L2 or L1 between decoded and input images)
         + commitment_cost · mean((sg(sign z) − z)²)
         + entropy_weight · (per-sample entropy − gamma · batch entropy)   [`lfq_losses`]

No GAN or perceptual loss: at the digits size, reconstruction alone gives sharp codes; at
ImageNet scale MaskBit adds perceptual + GAN terms, which are out of scope here.

Teacher (masked diffusion model) with MaskBit's objective: per sample r = mask_schedule(u),
u ~ U(0, 1); each of the L·S sub-tokens is masked independently with probability r (the
splits of one token independently); class labels are replaced by the drop label with
probability `class_dropout` (for classifier-free guidance); the loss is cross-entropy with
label smoothing over ALL positions (masked and visible), as MaskBit trains. AdamW with
linear warm-up and cosine decay; EMA of the parameters (with `ema_warmup`, the decay ramps
up as min(ema_decay, (1 + step) / (10 + step)) so the random initialisation does not linger
in the average). A batch holds either precomputed token ids ("tokens", (B, L) full ids) or
images ("image"), which the frozen tokenizer (passed in `frozen`) encodes inside the
jitted step — the ImageNet path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from softdimo_jax.core.masking import bernoulli_subtoken_mask
from softdimo_jax.core.optim import ema_rate, ema_update, make_optimizer
from softdimo_jax.models import lfq
from softdimo_jax.models.maskbit_bert import LFQBert, maskbit_bert_from_config
from softdimo_jax.models.maskbit_tokenizer import ConvVQModel, lfq_losses, maskbit_tokenizer_from_config


def tokenizer_from_config(model_cfg) -> ConvVQModel:
    return maskbit_tokenizer_from_config(model_cfg)


def make_tokenizer_phase(model: ConvVQModel, cfg, image_shape):
    """(init_fn, step_fn) for the Trainer. `cfg` = config.tokenizer.train;
    `image_shape` = (H, W, C)."""
    opt = make_optimizer(cfg.learning_rate, schedule="cosine", num_steps=cfg.num_steps,
                         warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                         grad_clip=cfg.grad_clip)
    if cfg.recon_loss not in ("l1", "l2"):
        raise ValueError(f"tokenizer.train.recon_loss must be 'l1' or 'l2', got {cfg.recon_loss!r}")

    def init_fn(rng):
        params = model.init(rng, jnp.zeros((1, *image_shape)))["params"]
        return {"params": params, "opt": opt.init(params)}

    def step_fn(state, batch, rng, step, frozen):
        images = batch["image"]

        def loss_fn(params):
            recon, enc = model.apply({"params": params}, images)
            err = recon - images
            recon_loss = jnp.mean(err**2) if cfg.recon_loss == "l2" else jnp.mean(jnp.abs(err))
            q = lfq_losses(enc["z"], cfg.commitment_cost, cfg.entropy_loss_weight,
                           cfg.entropy_loss_temperature, cfg.entropy_gamma)
            loss = recon_loss + q["quantizer_loss"]
            return loss, {"recon_loss": recon_loss, "commitment_loss": q["commitment_loss"],
                          "entropy_loss": q["entropy_loss"]}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt_state}, {"loss": loss, **aux}

    return init_fn, step_fn


def teacher_from_config(model_cfg, num_tokens: int, num_bits: int) -> LFQBert:
    return maskbit_bert_from_config(model_cfg, num_tokens=int(num_tokens), num_bits=int(num_bits))


def make_teacher_phase(model: LFQBert, cfg, tokenizer=None):
    """(init_fn, step_fn) for the Trainer. `cfg` = config.teacher.train. With `tokenizer`
    (a ConvVQModel), batches may carry images; its params come in `frozen["tokenizer"]`."""
    opt = make_optimizer(cfg.learning_rate, schedule="cosine", num_steps=cfg.num_steps,
                         warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, b1=cfg.b1,
                         b2=cfg.b2, grad_clip=cfg.grad_clip)
    splits, num_bits = model.splits, model.num_bits
    use_ema = cfg.ema_decay > 0

    def init_fn(rng):
        tokens = jnp.zeros((1, model.num_tokens, splits), jnp.int32)
        params = model.init(rng, tokens, jnp.zeros((1,), jnp.int32))["params"]
        state = {"params": params, "opt": opt.init(params)}
        if use_ema:
            state["ema"] = params
        return state

    def batch_tokens(batch, frozen):
        if "tokens" in batch:
            ids = batch["tokens"]
        elif "image" in batch:
            if tokenizer is None or not frozen or "tokenizer" not in frozen:
                raise ValueError("image batches need the frozen tokenizer (frozen={'tokenizer': params})")
            enc = tokenizer.apply({"params": frozen["tokenizer"]}, batch["image"], method=tokenizer.encode)
            ids = enc["indices"].reshape(enc["indices"].shape[0], -1)
        else:
            raise KeyError(f"teacher batches need 'tokens' or 'image', got {sorted(batch)}")
        if ids.shape[1] != model.num_tokens:
            raise ValueError(f"batch has {ids.shape[1]} tokens per image, the teacher expects {model.num_tokens}")
        return lfq.split_indices(ids, num_bits, splits)

    def step_fn(state, batch, rng, step, frozen):
        sub = batch_tokens(batch, frozen)
        labels = batch["label"]
        k_mask, k_drop, k_dropout = jax.random.split(rng, 3)
        inputs, mask = bernoulli_subtoken_mask(k_mask, sub, model.mask_token, cfg.mask_schedule)
        drop = jax.random.uniform(k_drop, labels.shape) < cfg.class_dropout
        targets = optax.smooth_labels(jax.nn.one_hot(sub, model.vocab_size), cfg.label_smoothing)

        def loss_fn(params):
            logits = model.apply({"params": params}, inputs, labels, drop_label_mask=drop,
                                 deterministic=False, rngs={"dropout": k_dropout})
            ce = optax.softmax_cross_entropy(logits, targets)  # (B, L, S)
            hits = (jnp.argmax(logits, -1) == sub).astype(jnp.float32)
            masked_acc = jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1)
            return jnp.mean(ce), masked_acc

        (loss, masked_acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt": opt_state}
        if use_ema:
            decay = ema_rate(step, cfg.ema_decay) if cfg.ema_warmup else cfg.ema_decay
            new["ema"] = ema_update(state["ema"], params, decay)
        return new, {"loss": loss, "masked_accuracy": masked_acc, "grad_norm": optax.global_norm(grads)}

    return init_fn, step_fn
