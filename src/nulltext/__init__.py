"""nulltext: null-text inversion for text-guided diffusion models.

    from nulltext import load_pipeline, invert
    pipe = load_pipeline("tiny")                      # or "sd14", a hub id, a local folder
    result = invert(pipe, "photo.jpg", "a cat on a sofa", method="null_text")
    result.z_T, result.null_embeddings, result.reconstruction, result.metrics
"""

from nulltext.api import InversionResult, invert, load_pipeline, reconstruct_artifact

__all__ = ["InversionResult", "invert", "load_pipeline", "reconstruct_artifact"]
