"""HTTP routers: ``/v1`` control plane (models, datasets, recalibrations) and ``/v2`` inference."""

__all__: list[str] = []
