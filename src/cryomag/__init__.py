"""cryomag: per-particle contrast scale and magnification for cryo-EM single-particle analysis."""

__version__ = "0.1.0"


def estimate(*args, **kwargs):
    """See :func:`cryomag.workflows.estimate.estimate`."""
    from cryomag.workflows.estimate import estimate as _estimate

    return _estimate(*args, **kwargs)
