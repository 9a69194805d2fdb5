"""`config.pipeline` -> the function `python -m softdimo_jax.main` runs, `fn(config, workdir)`."""

from softdimo_jax.pipelines import at_scale, digits, t2i

PIPELINES = {
    "digits": digits.train_and_evaluate,  # every stage on the embedded digits set
    "teacher": at_scale.teacher,  # MaskBit teacher on tfds images
    "distill": at_scale.distill,  # Di[M]O of a converted MaskBit / MaskGIT / MaskGen teacher
    "gan": at_scale.gan,  # Soft-Di[M]O GAN refinement of the distilled MaskBit
    "reward": at_scale.reward,  # reward fine-tuning of the refined MaskBit
    "t2i_reward": t2i.t2i_reward,  # text-to-image reward fine-tuning + TTEO of the distilled MaskGen / Meissonic
}
