"""Meissonic's parts of the at-scale `distill` pipeline (configs/meissonic_t2i_distill.py): the
random tiny models of the smoke preset, the prompt table (an .npz of precomputed embeddings, or
a prompt file encoded once at start by the converted Meissonic text tower) and the one-step grid.
`pipelines/at_scale.py` calls these from its family branches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.data import prompt_embeddings, prompts
from softdimo_jax.models.meissonic import MeissonicTransformer
from softdimo_jax.models.meissonic_vq import MeissonicVQModel
from softdimo_jax.runtime.errors import BadInput
from softdimo_jax.sampling import api
from softdimo_jax.sampling.meissonic_sampler import meissonic_one_step


def uses_random_models(config) -> bool:
    """True when the config asks for random models (the tiny preset) and names no teacher."""
    return bool(config.get("random_init")) and not config.get("teacher_checkpoint")


def _init_jit(fn):
    # Random init runs once: on CPU (the smoke preset) compile without optimisation (seconds saved).
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=opts)


def random_models(config):
    """(transformer, params, (vq, vq params)) initialised from config.distill.seed, in the
    distillation's compute dtype: the smoke preset's stand-ins for converted checkpoints."""
    dcfg = config.distill
    fields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.random_transformer.items()}
    model = MeissonicTransformer(**fields, dtype=jnp.dtype(dcfg.compute_dtype), remat=bool(dcfg.remat))
    h, w = tuple(dcfg.token_grid)
    rng = jax.random.PRNGKey(int(dcfg.seed))
    args = (jnp.zeros((1, h, w), jnp.int32), jnp.zeros((1, 1, model.joint_attention_dim)),
            jnp.zeros((1, model.pooled_projection_dim)), jnp.zeros((1, 5)), jnp.zeros((1,)))
    params = _init_jit(model.init)(rng, *args)["params"]
    vfields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.random_vq.items()}
    vq = MeissonicVQModel(**vfields)
    f = vq.downsample_factor
    vq_params = _init_jit(vq.init)(jax.random.fold_in(rng, 1), jnp.zeros((1, h * f, w * f, 3)))["params"]
    if vq.num_vq_embeddings != model.codebook_size:
        raise BadInput(f"random_vq.num_vq_embeddings {vq.num_vq_embeddings} != random_transformer.codebook_size "
                       f"{model.codebook_size} — make them equal")
    return model, params, (vq, vq_params)


def text_tower(config, model: MeissonicTransformer) -> api.TextEncoder:
    """config.text_encoder_checkpoint (a converted meissonic_text tower, checked against the
    transformer's widths), the CLIP BPE tokenizer (config.bpe_merges, else the packaged copy)
    and config.negative_prompt as the CFG branch's caption."""
    text = api.load_text_encoder(config.get("text_encoder_checkpoint") or "", config.get("bpe_merges") or None,
                                 "config.text_encoder_checkpoint", family="meissonic_text", pad="eot",
                                 null_prompt=str(config.negative_prompt))
    problem = api.family_sampling("meissonic_transformer").check_text(model, text.model)
    if problem:
        raise BadInput(f"config.text_encoder_checkpoint does not fit the teacher: {problem} — pass the text tower "
                       "converted from the same Meissonic release (text_encoder/)")
    return text


def encode_prompts(text: api.TextEncoder, captions, chunk: int = 64, mesh=None) -> prompts.PromptConditions:
    """Captions (and text.null_prompt) -> a PromptConditions table of Meissonic conditions
    (penultimate states, pooled projection), jitted with the frozen tower as an argument and
    the rows split over `mesh` (default: this process's devices)."""
    return prompts.encode_prompt_table(text.model, text.params, text.bpe, captions, null_prompt=text.null_prompt,
                                       chunk=chunk, pad=text.pad, mesh=prompts.local_mesh() if mesh is None else mesh)


def prompt_table(config, model: MeissonicTransformer, *, index=None, count=None):
    """This host's conditions: config.prompt_file encoded by the text tower (this host's
    captions, once), config.prompt_embeddings (.npz), or random ones when the config asks
    for random models and gives neither."""
    kw = dict(text_dim=model.joint_attention_dim, pooled_dim=model.pooled_projection_dim, index=index, count=count)
    path = config.get("prompt_embeddings") or ""
    prompt_file = config.get("prompt_file") or ""
    if path and prompt_file:
        raise BadInput("config.prompt_embeddings and config.prompt_file are both set — give one: the .npz of "
                       "precomputed embeddings, or the prompt file with config.text_encoder_checkpoint")
    if prompt_file:
        text = text_tower(config, model)
        mine = prompts.shard_prompts(prompts.read_prompts(prompt_file), index, count)
        return encode_prompts(text, mine, int(config.get("prompt_encode_chunk", 64)))
    if path:
        return prompt_embeddings.load_prompt_embeddings(path, **kw)
    if config.get("random_init"):
        arrays = prompt_embeddings.random_prompt_embeddings(
            int(config.random_prompts), int(config.random_text_len), model.joint_attention_dim,
            model.pooled_projection_dim, seed=int(config.distill.seed))
        return prompt_embeddings.conditions_from_arrays(arrays, name="random prompt embeddings", **kw)
    raise BadInput("config.prompt_file and config.prompt_embeddings are empty — pass a prompt file with "
                   "config.text_encoder_checkpoint, or an .npz of precomputed CLIP-H prompt embeddings "
                   "(see configs/meissonic_t2i_distill.py)")


def grid_conditions(config, model: MeissonicTransformer, n: int) -> dict:
    """The first n prompts of the whole table (the same rows on every host), repeated when the
    table is shorter: {"condition": (n, T, D), "pooled": (n, 1, P)}."""
    if config.get("prompt_file") and not config.get("prompt_embeddings"):
        captions = prompts.read_prompts(config.prompt_file)[:n]  # encode only the grid's captions
        table = encode_prompts(text_tower(config, model), captions, int(config.get("prompt_encode_chunk", 64)))
        return table.rows(np.arange(n) % len(table))
    table = prompt_table(config, model, index=0, count=1)
    return table.rows(np.arange(n) % len(table))


def reward_prompt_table(config, model: MeissonicTransformer):
    """The reward phase's table: as `prompt_table`, but an .npz must hold its `captions` (the
    rewards score the images against the captions' text)."""
    path = config.get("prompt_embeddings") or ""
    if path and not config.get("prompt_file"):  # both set: prompt_table refuses
        return prompt_embeddings.load_prompt_embeddings(
            path, text_dim=model.joint_attention_dim, pooled_dim=model.pooled_projection_dim, require_captions=True)
    return prompt_table(config, model)


def one_step_images(model, gen_params, vq, vq_params, conds, rng, dcfg, soft: bool):
    """One-step student images (N, H, W, 3) in [0, 1] (Di[M]O's generate_one_step): sampled ids
    through the VQ decoder, or softmax(z / soft.tau) @ codebook when soft."""
    ids, logits = meissonic_one_step(
        model, gen_params, conds["pooled"][:, 0], conds["condition"], rng,
        jnp.asarray(tuple(dcfg.micro_conds), jnp.float32), grid=tuple(int(g) for g in dcfg.token_grid),
        r_init=float(dcfg.r_init), noise_emb_perturb=float(dcfg.sigma_init),
        temperature=float(dcfg.sample.temperature))
    v = {"params": vq_params}
    if soft:
        probs = jax.nn.softmax(logits.astype(jnp.float32) / float(dcfg.soft.tau), axis=-1)
        img = vq.apply(v, probs, method=type(vq).decode_soft)
    else:
        img = vq.apply(v, ids, method=type(vq).decode_tokens)
    return jnp.clip(img, 0.0, 1.0)
