"""The classification table: every error the code raises or translates has one retry kind."""

from __future__ import annotations

import aiokafka.errors as aiokafka_errors
import pytest

from forwarder import errors
from forwarder.errors import ForwarderError, Retry
from forwarder.kafka import CONFIG_PROBLEMS, translate


def _all_subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _all_subclasses(sub)
    return found


@pytest.mark.parametrize("kind", sorted(CONFIG_PROBLEMS, key=lambda k: k.__name__))
def test_refusals_no_retry_can_mend_are_configuration_problems(kind: type) -> None:
    """Record too large, authorization refused, invalid topic...: CONFIG, never transient."""
    error = translate(kind(), "sending")
    assert isinstance(error, errors.KafkaConfigProblem)
    assert error.retry is Retry.CONFIG and not error.retriable
    assert kind.__name__ in str(error)


#: Written out, not read from CONFIG_PROBLEMS: dropping an entry there must fail here.
MUST_BE_CONFIGURATION = (
    aiokafka_errors.MessageSizeTooLargeError,
    aiokafka_errors.RecordListTooLargeError,
    aiokafka_errors.TopicAuthorizationFailedError,
    aiokafka_errors.GroupAuthorizationFailedError,
    aiokafka_errors.TransactionalIdAuthorizationFailed,
    aiokafka_errors.ClusterAuthorizationFailedError,
    aiokafka_errors.InvalidTopicError,
    aiokafka_errors.PolicyViolationError,
)


@pytest.mark.parametrize("kind", MUST_BE_CONFIGURATION, ids=lambda k: k.__name__)
def test_record_too_large_and_refused_authorization_are_never_transient(kind: type) -> None:
    """The issue's list: a record too large, an authorization refused, an invalid topic are
    configuration problems, whatever the table says."""
    assert translate(kind(), "sending").retry is Retry.CONFIG


def test_the_other_aiokafka_errors_keep_their_flag() -> None:
    """Fenced hands off, a dead sender is replaced and retried, a timeout is transient, the rest
    follow aiokafka's own retriable flag."""
    assert translate(aiokafka_errors.ProducerFenced(), "x").retry is Retry.HAND_OFF
    assert isinstance(
        translate(aiokafka_errors.OutOfOrderSequenceNumber(), "x"), errors.ProducerFailed
    )
    assert translate(aiokafka_errors.KafkaTimeoutError(), "x").retry is Retry.BACKOFF
    assert translate(aiokafka_errors.NotLeaderForPartitionError(), "x").retry is Retry.BACKOFF
    assert translate(aiokafka_errors.CorruptRecordException(), "x").retry is Retry.NEVER


def test_every_error_class_has_a_kind_and_a_code() -> None:
    """Each class of the error tree says what to do about it and how to name it."""
    for cls in _all_subclasses(ForwarderError):
        assert isinstance(cls.retry, Retry) or cls.__init__ is not ForwarderError.__init__
        assert cls.code and cls.code != "forwarder_error", cls
    assert errors.TopicMissing("t").retry is Retry.CONFIG
    assert errors.KafkaError("x").retry is Retry.BACKOFF
    assert errors.KafkaError("x", retriable=False).retry is Retry.NEVER
    assert errors.BatchTimeout("x").retry is Retry.NEVER
    assert errors.UpstreamRejected("x").retry is Retry.NEVER
    assert errors.BatchNotReady("x").retry is Retry.LATER
    assert errors.InvalidJob("x").retry is Retry.NEVER
