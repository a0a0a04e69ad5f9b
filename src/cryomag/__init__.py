"""cryomag: per-particle contrast scale and magnification for cryo-EM single-particle analysis."""

__version__ = "0.1.0"
