"""The package layout's rules that import-linter cannot see.

import-linter (`make lint`, `make test`) keeps the import rules: the wire contract
never imports the face model, the doorbell and the aggregator never import each
other. What it cannot check is a value written twice because of that rule.
"""

from __future__ import annotations

from fedbell.faces.embedding import TrainParams
from fedbell.wire.protocol import TrainingPlan


def test_the_round_plan_defaults_are_the_client_steps_own() -> None:
    plan, params = TrainingPlan(), TrainParams()
    assert (
        plan.epochs,
        plan.batch_size,
        plan.learning_rate,
        plan.optimizer,
        plan.adam_moments,
    ) == (
        params.epochs,
        params.batch_size,
        params.learning_rate,
        params.optimizer,
        params.adam_moments,
    )
