"""A deploy through the link service as a Dagster step: its outcome, or a Failure that says what happened."""

import dagster as dg

from tinyml_dagster.deployment_agent import (Package, deploy_outcome_metadata, deploy_through_link_service,
                                             failure_reason, progress_line)
from tinyml_dagster.knowledge_base import KnowledgeBase


def deploy_or_fail(kb: KnowledgeBase, pkg: Package, timeout_s: float, context: dg.OpExecutionContext,
                   episode_id: int | None = None) -> dict:
    """Queue pkg for the link service and wait (the outcome's "progress": the reports seen); a refusal, a silent
    device or a stalled service is a dg.Failure."""
    what = "deploy of %s v%d to %s" % (pkg.model_id, pkg.version, pkg.device_id)
    progress: list[dict] = []

    def report(p: dict) -> None:
        progress.append(p)
        context.log.info(progress_line(p))

    try:
        outcome = deploy_through_link_service(kb, pkg, timeout_s=timeout_s, episode_id=episode_id,
                                              run_id=context.run.run_id, on_progress=report)
    except TimeoutError as e:
        raise dg.Failure(description="%s: %s" % (what, e)) from None
    outcome["progress"] = progress
    if outcome["status"] != "done":
        why = "%s failed: %s" % (what, failure_reason(outcome["error"]))
        context.log.error(why)
        raise dg.Failure(description=why, metadata=deploy_outcome_metadata(outcome))
    return outcome
