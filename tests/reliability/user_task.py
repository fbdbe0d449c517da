"""A user's own task class outside the project's packages (the trust_config=true case of the reliability suite)."""

from unirep.toy import ToyFlowTask


class UserToyTask(ToyFlowTask):
    pass
