"""Many images on a Ray Data actor pool: one pipeline per actor, on a GPU when the cluster has or can add them.

Requests stream through ``map_batches`` (``compute=ActorPoolStrategy``) one at a time; each actor
loads the pipeline and merges the adapter once, renders, and sends the PNG back. The driver alone
writes files and the index, so the output folder needs to be reachable from the driver only (on a
cluster: the head node), and an interrupted run keeps every image that had arrived.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from raytuner.errors import RaytunerError
from raytuner.generate.index import GenerationIndex
from raytuner.generate.prompts import ImageRequest
from raytuner.generate.render import ImageRenderer, Rendered
from raytuner.generate.settings import GenerateError, GenerationSettings

logger = logging.getLogger(__name__)


class RenderActor:
    """Ray Data actor: the run's pipeline, built once, rendering each request of a batch.

    A pipeline that cannot be built here (a model or adapter this node cannot load) is answered
    as data, an ``error`` row: an exception in an actor's constructor reaches the driver only as
    the text of an ``ActorDiedError``, traceback and all, after Ray Data has retried the actor.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.renderer: ImageRenderer | None = None
        self.error = ""
        try:
            self.renderer = ImageRenderer(GenerationSettings.from_dict(settings), progress=False)
        except RaytunerError as error:  # GenerateError, or the adapter's, CLIP model's or safety checker's
            self.error = str(error)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            name: []
            for name in (
                "request", "png", "width", "height", "seconds", "refused", "clip_score", "dtype", "error",
            )
        }  # fmt: skip
        for text in batch["request"]:
            if self.renderer is None:
                rendered = Rendered(
                    request=ImageRequest(**json.loads(str(text))), png=None, width=0, height=0, seconds=0.0
                )
            else:
                rendered = self.renderer.render(ImageRequest(**json.loads(str(text))))
            out["error"].append(self.error)
            out["request"].append(str(text))
            out["png"].append(rendered.png or b"")
            out["width"].append(rendered.width)
            out["height"].append(rendered.height)
            out["seconds"].append(rendered.seconds)
            out["refused"].append(rendered.refused or "")
            out["clip_score"].append(math.nan if rendered.clip_score is None else rendered.clip_score)
            out["dtype"].append(rendered.dtype)
        return out


def render_on_ray(
    settings: GenerationSettings,
    requests: Sequence[ImageRequest],
    index: GenerationIndex,
    *,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
) -> int:
    """Render ``requests`` on the connected Ray; each image is recorded in ``index`` as it arrives.

    Returns how many were rendered. A pipeline an actor cannot build (a model or adapter that does
    not load there) is raised here as the one-line :class:`GenerateError` the actor met.
    """
    import ray

    from raytuner.placement import actor_gpus, cluster_facts, default_actor_count

    # One actor per GPU of the cluster, else one; a GPU each when the cluster has GPUs or its
    # autoscaler can add them (the request is what adds them).
    cluster = cluster_facts()
    gpus = actor_gpus(cluster)
    size = min(actors or default_actor_count(cluster), len(requests))
    logger.info(
        "rendering %d image(s) on %d Ray Data actor(s) (%s each: %s)",
        len(requests),
        size,
        f"{gpus} GPU" if gpus else f"{cpus_per_actor:g} CPU",
        cluster.describe(),
    )
    dataset = ray.data.from_items(
        [{"request": json.dumps(request.to_dict(), ensure_ascii=False)} for request in requests],
        override_num_blocks=min(len(requests), 64),
    ).map_batches(
        RenderActor,
        fn_constructor_kwargs={"settings": settings.to_dict()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_gpus=gpus,
        num_cpus=cpus_per_actor,
    )
    rendered_count = 0
    with tqdm(total=len(requests), desc="images", unit="image") as progress:
        for row in dataset.iter_rows():
            if row["error"]:
                raise GenerateError(str(row["error"]))
            index.add(_rendered_from_row(row))
            rendered_count += 1
            progress.update(1)
    return rendered_count


def _rendered_from_row(row: dict[str, Any]) -> Rendered:
    clip_score = float(row["clip_score"])
    return Rendered(
        request=ImageRequest(**json.loads(row["request"])),
        png=bytes(row["png"]) or None,
        width=int(row["width"]),
        height=int(row["height"]),
        seconds=float(row["seconds"]),
        refused=str(row["refused"]) or None,
        clip_score=None if math.isnan(clip_score) else clip_score,
        dtype=str(row["dtype"]),
    )
