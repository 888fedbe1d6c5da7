"""Where a model call sits in the sampling, from its timestep (both hosts read progress the same way)."""

from __future__ import annotations


def progress_from_timestep(timestep: float, num_timesteps: float = 1000.0) -> float:
    """Fraction of the denoising done at ``timestep``: 0 at the noisiest step, 1 at the end.

    Parameters
    ----------
    timestep : float
        The model's discrete-time timestep (``num_timesteps - 1`` = pure noise, 0 = clean).
    num_timesteps : float
        Training timesteps of the noise schedule (1000 for SD).

    Returns
    -------
    float in [0, 1]
    """
    total = float(num_timesteps) if num_timesteps else 1000.0
    return min(max(1.0 - float(timestep) / total, 0.0), 1.0)
