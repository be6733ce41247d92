"""The hooks most stage kinds share (see solar_merge.kinds): a kind whose inputs are the base
models of what it makes, that trains on no data set and writes no scores, imports these as
its own."""

from solar_merge.kinds.context import StagePlan


def card(plan: StagePlan) -> dict:
    """Its inputs are base models in the final model's lineage; it adds no data set."""
    return {"bases": plan.inputs, "datasets": []}


def training_data(body: dict) -> list[str]:
    """It trains on no data set."""
    return []


def metrics(plan: StagePlan) -> None:
    """It writes no scores."""


def hub_results(plan: StagePlan, model: str) -> list:
    """It scores no model for the Hub card."""
    return []
