from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_MODE_UNSPECIFIED: _ClassVar[PolicyMode]
    POLICY_MODE_OFF: _ClassVar[PolicyMode]
    POLICY_MODE_FIXED: _ClassVar[PolicyMode]
    POLICY_MODE_SMARTSPEC: _ClassVar[PolicyMode]
    POLICY_MODE_SMARTSPEC_UNIFORM: _ClassVar[PolicyMode]
POLICY_MODE_UNSPECIFIED: PolicyMode
POLICY_MODE_OFF: PolicyMode
POLICY_MODE_FIXED: PolicyMode
POLICY_MODE_SMARTSPEC: PolicyMode
POLICY_MODE_SMARTSPEC_UNIFORM: PolicyMode

class CostModel(_message.Message):
    __slots__ = ("verify_token_knots", "verify_ms_at_knots", "verify_ms_per_kv_token", "proposer_rtt_ms", "verify_relative_error", "verify_ms_per_request", "draft_step_ms", "draft_ms_per_token", "num_steps")
    VERIFY_TOKEN_KNOTS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_AT_KNOTS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_PER_KV_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    verify_token_knots: _containers.RepeatedScalarFieldContainer[float]
    verify_ms_at_knots: _containers.RepeatedScalarFieldContainer[float]
    verify_ms_per_kv_token: float
    proposer_rtt_ms: float
    verify_relative_error: float
    verify_ms_per_request: float
    draft_step_ms: float
    draft_ms_per_token: float
    num_steps: int
    def __init__(self, verify_token_knots: _Optional[_Iterable[float]] = ..., verify_ms_at_knots: _Optional[_Iterable[float]] = ..., verify_ms_per_kv_token: _Optional[float] = ..., proposer_rtt_ms: _Optional[float] = ..., verify_relative_error: _Optional[float] = ..., verify_ms_per_request: _Optional[float] = ..., draft_step_ms: _Optional[float] = ..., draft_ms_per_token: _Optional[float] = ..., num_steps: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("mode", "k", "k_max", "cost_model", "acceptance_prior", "acceptance_prior_weight", "version")
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    K_MAX_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_PRIOR_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    mode: PolicyMode
    k: int
    k_max: int
    cost_model: CostModel
    acceptance_prior: float
    acceptance_prior_weight: float
    version: int
    def __init__(self, mode: _Optional[_Union[PolicyMode, str]] = ..., k: _Optional[int] = ..., k_max: _Optional[int] = ..., cost_model: _Optional[_Union[CostModel, _Mapping]] = ..., acceptance_prior: _Optional[float] = ..., acceptance_prior_weight: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("step_id", "batch_size", "num_batched_tokens", "num_kv_tokens", "num_prefill_tokens", "proposed", "accepted", "verify_ms", "propose_ms", "draft_ms", "step_ms", "emitted_tokens", "draft_steps", "draft_tokens", "planned_k", "draft_busy_ms")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_K_FIELD_NUMBER: _ClassVar[int]
    DRAFT_BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    batch_size: int
    num_batched_tokens: int
    num_kv_tokens: int
    num_prefill_tokens: int
    proposed: _containers.RepeatedScalarFieldContainer[int]
    accepted: _containers.RepeatedScalarFieldContainer[int]
    verify_ms: float
    propose_ms: float
    draft_ms: float
    step_ms: float
    emitted_tokens: int
    draft_steps: int
    draft_tokens: int
    planned_k: _containers.RepeatedScalarFieldContainer[int]
    draft_busy_ms: float
    def __init__(self, step_id: _Optional[int] = ..., batch_size: _Optional[int] = ..., num_batched_tokens: _Optional[int] = ..., num_kv_tokens: _Optional[int] = ..., num_prefill_tokens: _Optional[int] = ..., proposed: _Optional[_Iterable[int]] = ..., accepted: _Optional[_Iterable[int]] = ..., verify_ms: _Optional[float] = ..., propose_ms: _Optional[float] = ..., draft_ms: _Optional[float] = ..., step_ms: _Optional[float] = ..., emitted_tokens: _Optional[int] = ..., draft_steps: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., planned_k: _Optional[_Iterable[int]] = ..., draft_busy_ms: _Optional[float] = ...) -> None: ...

class VerifierReport(_message.Message):
    __slots__ = ("verifier_id", "steps")
    VERIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    verifier_id: str
    steps: _containers.RepeatedCompositeFieldContainer[StepMetrics]
    def __init__(self, verifier_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepMetrics, _Mapping]]] = ...) -> None: ...

class ProposerEndpoints(_message.Message):
    __slots__ = ("addresses", "version")
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    version: int
    def __init__(self, addresses: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ...) -> None: ...

class ControllerUpdate(_message.Message):
    __slots__ = ("policy", "endpoints")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    endpoints: ProposerEndpoints
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., endpoints: _Optional[_Union[ProposerEndpoints, _Mapping]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("mode", "k", "k_max")
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    K_MAX_FIELD_NUMBER: _ClassVar[int]
    mode: PolicyMode
    k: int
    k_max: int
    def __init__(self, mode: _Optional[_Union[PolicyMode, str]] = ..., k: _Optional[int] = ..., k_max: _Optional[int] = ...) -> None: ...
