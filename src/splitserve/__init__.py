"""splitserve: CPU pre/post-processing in worker processes, batched inference in engines."""

from splitserve.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unprocessable,
    UnsupportedMediaType,
)
from splitserve.service import Model, Request, Service, Tensors

__all__ = [
    "BadRequest",
    "Model",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Request",
    "Service",
    "ServiceError",
    "Tensors",
    "Unprocessable",
    "UnsupportedMediaType",
]
__version__ = "0.1.0"
