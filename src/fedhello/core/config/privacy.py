"""The ``[privacy]`` section: client-level differential privacy (DP-FedAvg for partial
updates, ``fedhello.core.privacy``). Off unless ``noise-multiplier`` is given.

Why these settings and defaults:

- ``noise-multiplier`` z: each per-tensor sum of clipped updates gets Gaussian noise of standard
  deviation ``z * clip-norm``. fedhello samples a fixed number of clients per round without
  replacement, so its neighbouring relation is *replace one client's data*, under which one
  client moves a sum by up to ``2 * clip-norm`` (its update out, another's in): the accountant
  sees the noise multiplier ``z / 2`` (``fedhello.core.privacy.accountant``). 0 clips without
  noise (no privacy: epsilon is infinite), to measure what clipping alone costs.
- ``clipping = "adaptive"`` (Andrew et al., NeurIPS 2021): the clip norm follows the
  ``target-quantile`` of the clients' update norms, from a noisy count of the clients that were
  not clipped (standard deviation ``count-noise``, default ``per-round / 20``, the paper's); the
  count is a release too, so the updates' noise grows to keep the round's privacy equal to the
  fixed clipping's at the same ``noise-multiplier``.
- ``clip-on = "client"``: a client clips its own update before it leaves (the server never sees
  an unclipped update, and rejects one whose norm exceeds the round's clip norm); ``"server"``
  for a trusted server that clips on arrival.
- ``delta`` (default ``1 / num-clients``, a weak one for few clients: see the README) and
  ``target-epsilon``: a run whose accounted epsilon would exceed the target stops after the last
  round within it (the run is then that many rounds long: its schedule follows), or is refused
  before round 1.
- ``noise = "secret"``: the noise, the clip norm's noisy count and the client sampling come from
  a key drawn afresh for every run and kept only in the server's checkpoints (resume is exact,
  nothing released holds it). Amplification by sampling needs the sample secret, and noise
  anyone can regenerate protects nothing: with ``"seeded"`` they derive from ``run.seed``, which
  the config holds, so the accounted epsilon holds only against whoever cannot learn the seed.
  ``"seeded"`` is for studies and tests (paired strategies, reruns that reproduce), never for a
  deployment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedhello.core.config.sections import Section

Clipping = Literal["fixed", "adaptive"]
ClipOn = Literal["client", "server"]
Noise = Literal["secret", "seeded"]
# the settings only adaptive clipping reads (``fedhello.core.privacy.server``)
ADAPTIVE_ONLY = ("target_quantile", "clip_lr", "count_noise")


class PrivacyConfig(Section):
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="client-level DP-FedAvg: Gaussian noise of std noise_multiplier x clip_norm "
        "on each per-tensor sum of clipped client updates (unset: DP off; 0: clipping only, "
        "no privacy)",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="L2 norm C each client's whole update (every uploaded tensor minus the "
        "global one it received, the head included) is clipped to; with adaptive clipping, "
        "its starting value",
    )
    clipping: Clipping = Field(
        "fixed",
        description="fixed (C as given) or adaptive (C follows target_quantile of the update "
        "norms, Andrew et al. 2021)",
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive: the share of clients meant to be left unclipped"
    )
    clip_lr: float = Field(
        0.2, gt=0, description="adaptive: geometric step of C, C *= exp(-clip_lr (b - quantile))"
    )
    count_noise: float | None = Field(
        None,
        gt=0,
        description="adaptive: std of the noise on the count of unclipped clients (default "
        "clients.per_round / 20)",
    )
    clip_on: ClipOn = Field(
        "client",
        description="client (each client clips before its update leaves) or server (a trusted "
        "server clips on arrival)",
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="the delta epsilon is accounted at (default 1 / num_clients)"
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="privacy budget: the run stops after the last round whose epsilon is "
        "within it, and is refused if round 1 already exceeds it",
    )

    noise: Noise = Field(
        "secret",
        description="secret (noise and client sampling from a per-run key only the server's "
        "checkpoints hold: the guarantee) or seeded (from run.seed: reproducible, for studies "
        "and tests; no guarantee against whoever knows the seed)",
    )

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None

    @model_validator(mode="after")
    def _nothing_without_noise(self) -> PrivacyConfig:
        """A setting given while DP is off would be silently ignored: a user who wrote a budget
        would get a run without privacy. Refused instead."""
        given = sorted(self.model_fields_set - {"noise_multiplier"})
        if not self.enabled and given:
            raise ValueError(
                f"privacy.{given[0]} without privacy.noise_multiplier: DP is off unless "
                "noise_multiplier is set, so it would be ignored; allowed: set "
                "noise_multiplier (0 for clipping alone), or leave [privacy] out"
            )
        return self

    @model_validator(mode="after")
    def _adaptive_settings_need_adaptive_clipping(self) -> PrivacyConfig:
        """A setting only adaptive clipping reads, given with fixed clipping, would be silently
        ignored: a user who tuned the quantile would get a fixed clip norm. Refused instead.
        Compared with the defaults rather than with what was given, because a run's saved
        config.toml spells every default out (``Config.to_toml``) and must load again."""
        if not self.enabled or self.clipping == "adaptive":
            return self  # DP off: the check above names what was given
        fields = type(self).model_fields
        changed = [k for k in ADAPTIVE_ONLY if getattr(self, k) != fields[k].default]
        if changed:
            settings = ", ".join(f"privacy.{k} = {getattr(self, k):g}" for k in changed)
            defaults = ", ".join(f"{k} = {_shown(fields[k].default)}" for k in changed)
            one = len(changed) == 1
            raise ValueError(
                f"{settings} with privacy.clipping = 'fixed': only adaptive clipping reads "
                f"{'it, so it' if one else 'them, so they'} would be ignored; allowed: "
                f"clipping = 'adaptive', or the default{'' if one else 's'} ({defaults})"
            )
        return self


def _shown(default: object) -> str:
    """A default as a config would write it: unset (None) leaves the key out."""
    return "unset" if default is None else f"{default:g}"
