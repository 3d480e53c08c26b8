"""The OpenAPI schema and its Swagger UI, served with errors that are problem+json JSON like every
other answer of the API. (Apart from sessions_app.api.schema: DRF imports that module while these
views' base classes are being imported.)"""

from __future__ import annotations

from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.response import Response

from sessions_app.api.http import OrjsonRenderer
from sessions_app.api.problems import PROBLEM_CONTENT_TYPE


class ProblemErrors:
    """A view whose answers are not JSON (the schema's YAML, Swagger UI's HTML) still answers its
    errors as problem+json JSON. DRF renders an error with the renderer the request negotiated, or,
    when negotiation is what failed (an unknown ?format=, an Accept it cannot meet), with the view's
    first: YAML (or a bare "406 Not Acceptable" text) under the problem+json content type."""

    def handle_exception(self, exc: Exception) -> Response:
        response: Response = super().handle_exception(exc)  # type: ignore[misc]
        self.request.accepted_renderer = OrjsonRenderer()  # type: ignore[attr-defined]
        self.request.accepted_media_type = PROBLEM_CONTENT_TYPE  # type: ignore[attr-defined]
        return response


class SchemaView(ProblemErrors, SpectacularAPIView):
    pass


class DocsView(ProblemErrors, SpectacularSwaggerSplitView):
    pass
