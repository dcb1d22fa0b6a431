"""PyTorch reference of BiOST's autoencoders and phase-II step (AdAGeo phase 1, DDDA).

Written from the layer list of recipes_facts.md A.1.2 and the losses of A.1.4, not from jaxvpr:
``nn.Sequential`` named ``model`` as in BiOST's ``ResnetEncoder``/``ResnetDecoder`` (so the state
dicts have BiOST's keys), ``ResnetBlock.conv_block``. Used by ``tests/test_ddda.py`` (parity,
conversion, gradients) and ``bench/ddda_step.py`` (speed). Importing it needs torch.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as tnn
import torch.nn.functional as F

KL_WEIGHT = 0.001
FEATURE_CYCLE_WEIGHT = 0.001


class ResnetBlock(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_block = tnn.Sequential(
            tnn.ReflectionPad2d(1), tnn.Conv2d(dim, dim, 3), tnn.InstanceNorm2d(dim), tnn.ReLU(True),
            tnn.ReflectionPad2d(1), tnn.Conv2d(dim, dim, 3), tnn.InstanceNorm2d(dim),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class Encoder(tnn.Module):
    """BiOST ``ResnetEncoder`` (A.1.2): 7x7 conv, ``n_down`` stride-2 convs, ``n_res`` blocks."""

    def __init__(self, ngf=64, n_down=2, n_res=4):
        super().__init__()
        layers = [tnn.ReflectionPad2d(3), tnn.Conv2d(3, ngf, 7), tnn.InstanceNorm2d(ngf), tnn.ReLU(True)]
        for i in range(n_down):
            c = ngf * 2 ** i
            layers += [tnn.Conv2d(c, 2 * c, 3, stride=2, padding=1), tnn.InstanceNorm2d(2 * c), tnn.ReLU(True)]
        layers += [ResnetBlock(ngf * 2 ** n_down) for _ in range(n_res)]
        self.model = tnn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class Decoder(tnn.Module):
    """BiOST ``ResnetDecoder`` (A.1.2): ``n_res`` blocks, ``n_down`` transposed convs, 7x7 conv + tanh."""

    def __init__(self, ngf=64, n_down=2, n_res=4):
        super().__init__()
        layers = [ResnetBlock(ngf * 2 ** n_down) for _ in range(n_res)]
        for i in range(n_down):
            c = ngf * 2 ** (n_down - i)
            layers += [tnn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                       tnn.InstanceNorm2d(c // 2), tnn.ReLU(True)]
        layers += [tnn.ReflectionPad2d(3), tnn.Conv2d(ngf, 3, 7), tnn.Tanh()]
        self.model = tnn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def phase2_losses(enc_a, dec_a, enc_b, dec_b, a, b, feature_cycle: bool = False):
    """BiOST ``backward_G`` (A.1.4), a = target T, b = source S: ``(loss_G_A, loss_G_B)``."""
    z_a, z_b = enc_a(a), enc_b(b)
    fake_ab, fake_ba = dec_b(z_a), dec_a(z_b)
    z_ba = enc_a(fake_ba)
    fake_aba, fake_bab = dec_a(enc_b(fake_ab)), dec_b(z_ba)
    loss_a = F.l1_loss(fake_aba, a) + F.l1_loss(dec_a(z_a), a) + KL_WEIGHT * torch.mean(z_a ** 2)
    if feature_cycle:
        loss_a = loss_a + FEATURE_CYCLE_WEIGHT * F.mse_loss(z_ba, z_b.detach())
    loss_b = F.l1_loss(fake_bab, b) + F.l1_loss(dec_b(z_b), b) + KL_WEIGHT * torch.mean(z_b ** 2)
    return loss_a, loss_b


class Phase2Step:
    """One BiOST phase-II step, batch 1: Adam A (Enc_A + Dec_A) on loss_G_A, Adam B on loss_G_B
    (lr 2e-4, betas 0.5, 0.999). Both gradients are taken before either update
    (``torch.autograd.grad``): BiOST's PyTorch-0.x order (step A, then backward B through A's
    changed weights) is refused by modern autograd, and it is what jaxvpr computes."""

    def __init__(self, enc_a, dec_a, enc_b, dec_b, lr: float = 2e-4, feature_cycle: bool = False):
        self.nets = (enc_a, dec_a, enc_b, dec_b)
        self.params_a = list(itertools.chain(enc_a.parameters(), dec_a.parameters()))
        self.params_b = list(itertools.chain(enc_b.parameters(), dec_b.parameters()))
        self.opt_a = torch.optim.Adam(self.params_a, lr=lr, betas=(0.5, 0.999))
        self.opt_b = torch.optim.Adam(self.params_b, lr=lr, betas=(0.5, 0.999))
        self.feature_cycle = feature_cycle

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        loss_a, loss_b = phase2_losses(*self.nets, a, b, self.feature_cycle)
        grads_a = torch.autograd.grad(loss_a, self.params_a, retain_graph=True)
        grads_b = torch.autograd.grad(loss_b, self.params_b)
        for params, grads in ((self.params_a, grads_a), (self.params_b, grads_b)):
            for p, g in zip(params, grads):
                p.grad = g
        self.opt_a.step()
        self.opt_b.step()
        return loss_a.detach(), loss_b.detach()
