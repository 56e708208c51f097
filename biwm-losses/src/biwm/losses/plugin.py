"""Entry point of biwm-losses: the ``gan`` and ``forward-kl`` distillation losses."""

from biwm.core import hookimpl


@hookimpl
def register_losses(register):
    from biwm.losses.forward_kl import ForwardKL, ForwardKLOptions
    from biwm.losses.gan import GAN, GANOptions

    register("gan", GAN, options=GANOptions,
             description="discriminator head (register tokens over critic blocks) with softplus losses, optional R1")
    register("forward-kl", ForwardKL, options=ForwardKLOptions,
             description="DMD gradient weighted by the discriminator's density ratio (forward KL, JS, reverse KL)")
