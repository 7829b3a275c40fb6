"""The leadership state machine (pbkv/leadership.py): each rule, event by event."""

from __future__ import annotations

import pytest

from pbkv.coordinator import Leader, SyncRecord
from pbkv.leadership import (
    EMPTY,
    Action,
    BackupInSync,
    BackupLost,
    BecomeBackup,
    BecomePrimary,
    BecomeSpare,
    Campaign,
    CampaignAnswered,
    CampaignResult,
    CopyChanged,
    EtcdFailed,
    Fence,
    GrantLease,
    Holding,
    KeepAlive,
    KeepaliveAnswered,
    LeaderObserved,
    Leadership,
    LeaseGranted,
    Operation,
    Phase,
    ReadLeader,
    ReadSync,
    RecordResult,
    RecordSync,
    RecordSyncAnswered,
    Register,
    Resign,
    RevokeLease,
    Role,
    Started,
    Stop,
    StopFollowing,
    SyncObserved,
    Tick,
    Timing,
    address_of,
    campaign_refusal,
    lease_valid_until,
    member_name,
)

TIMING = Timing(ttl=3.0, margin=0.3, keepalive_interval=0.9, request_timeout=0.9)
ME = member_name("10.0.0.1:7000", "a1")
OTHER = member_name("10.0.0.2:7000", "b1")
THIRD = member_name("10.0.0.3:7000", "c1")
LEASE = 0x1000
COPY = Holding(confirmed=True, epoch=5, history=7, seq=40)


def kinds(actions: list[Action]) -> list[type[Action]]:
    """The actions but registrations (those follow every change of status)."""
    return [type(a) for a in actions if not isinstance(a, Register)]


def without_register(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Register)]


def started(holding: Holding = COPY, at: float = 0.0) -> Leadership:
    """A member with a lease granted (sent at ``at``), that has read nothing yet."""
    machine = Leadership(TIMING)
    assert kinds(machine.handle(Started(at, ME, holding))) == [GrantLease, ReadLeader]
    actions = machine.handle(LeaseGranted(at + 0.01, at, LEASE, 3.0))
    assert kinds(actions) == [ReadSync]
    assert any(isinstance(a, Register) for a in actions)
    return machine


def sync_read(now: float, sent: float, record: SyncRecord | None) -> SyncObserved:
    """A read of ``record``, written (if at all) at the revision after its epoch's."""
    return SyncObserved(now, sent, record, 0 if record is None else record.epoch + 1)


def leader_gone(
    machine: Leadership, record: SyncRecord | None, now: float = 0.1, revision: int = 10
) -> list[Action]:
    actions = machine.handle(LeaderObserved(now, None, revision))
    return actions + machine.handle(sync_read(now + 0.01, now, record))


RECORDED_ME = SyncRecord(5, ME)
CONFIRMED = 6  # the record's mod revision as read by primary(): what its first record expects


def ok(now: float, backup: str, revision: int, epoch: int = 20) -> RecordSyncAnswered:
    """etcd's answer to a record that landed at ``revision``."""
    return RecordSyncAnswered(now, epoch, backup, RecordResult.OK, revision)


def primary(epoch: int = 20, record: SyncRecord | None = RECORDED_ME) -> Leadership:
    """A member that won ``epoch`` and confirmed the record at 0.2 (lease sent at 0)."""
    machine = started()
    assert kinds(leader_gone(machine, record)) == [StopFollowing, Campaign]
    actions = machine.handle(CampaignAnswered(0.15, 0.12, LEASE, CampaignResult.WON, epoch))
    assert kinds(actions) == [ReadSync]
    assert without_register(machine.handle(sync_read(0.2, 0.16, record))) == [BecomePrimary(epoch)]
    return machine


# -- names ----------------------------------------------------------------------------------


def test_a_member_name_is_an_incarnation_at_an_address() -> None:
    assert address_of(member_name("[::1]:7000", "x")) == "[::1]:7000"
    assert member_name("h:1", "run1") != member_name("h:1", "run2")


# -- rule (a): who may become primary ---------------------------------------------------------

RESTARTED = member_name("10.0.0.1:7000", "a2")  # ME's address, a new process

ELIGIBILITY = [
    # (holding, record, refused?, words in the reason)
    (EMPTY, None, False, ""),  # a brand-new cluster: anyone, even empty
    (COPY, None, False, ""),
    (COPY, SyncRecord(5, ME), False, ""),
    (Holding(True, 9), SyncRecord(5, ME), False, ""),  # promoted since, still the record's
    (COPY, SyncRecord(5, OTHER), True, OTHER),
    (COPY, SyncRecord(5, RESTARTED), True, RESTARTED),
    (Holding(False, 5), SyncRecord(5, ME), True, "incomplete"),
    (EMPTY, SyncRecord(5, ME), True, "incomplete"),
    (Holding(True, 4), SyncRecord(5, ME), True, "older"),
    (COPY, SyncRecord(5, None), True, "no in-sync backup"),
]


@pytest.mark.parametrize(("holding", "record", "refused", "words"), ELIGIBILITY)
def test_campaign_refusal(
    holding: Holding, record: SyncRecord | None, refused: bool, words: str
) -> None:
    reason = campaign_refusal(ME, holding, record)
    assert (reason is not None) is refused
    assert words in (reason or "")


def test_a_restarted_member_is_not_the_recorded_backup_even_at_the_same_address() -> None:
    machine = Leadership(TIMING)
    machine.handle(Started(0.0, RESTARTED, EMPTY))
    machine.handle(LeaseGranted(0.01, 0.0, LEASE, 3.0))
    actions = leader_gone(machine, SyncRecord(5, ME))
    assert Campaign not in kinds(actions)
    why = machine.why_not_primary(0.2) or ""
    assert ME in why and "may be promoted" in why


@pytest.mark.parametrize(("holding", "record", "refused", "words"), ELIGIBILITY)
def test_only_an_eligible_member_campaigns(
    holding: Holding, record: SyncRecord | None, refused: bool, words: str
) -> None:
    machine = started(holding)
    actions = leader_gone(machine, record)
    if refused:
        assert Campaign not in kinds(actions)
        assert words in (machine.why_not_primary(0.2) or "")
    else:
        # It stops applying the old epoch's frames before it campaigns (rule b).
        assert kinds(actions) == [StopFollowing, Campaign]


def test_no_campaign_before_the_record_is_read_nor_while_a_leader_exists() -> None:
    machine = started()
    assert Campaign not in kinds(machine.handle(LeaderObserved(0.1, None, 10)))
    assert machine.why_not_primary(0.1) == "the in-sync record has not been read yet"
    machine2 = started()
    machine2.handle(LeaderObserved(0.1, Leader(OTHER, 9), 10))
    assert Campaign not in kinds(machine2.handle(sync_read(0.2, 0.1, SyncRecord(5, ME))))
    assert machine2.why_not_primary(0.2) == f"{OTHER} is the primary (epoch 9)"


def test_the_record_read_after_winning_decides_and_a_refused_winner_resigns() -> None:
    """A member that saw "no record" (a new cluster) long ago and wins after some
    other member's whole tenure finds that tenure's record: it resigns, never serves."""
    machine = started(EMPTY)
    assert kinds(leader_gone(machine, None)) == [StopFollowing, Campaign]
    actions = machine.handle(CampaignAnswered(1.0, 0.9, LEASE, CampaignResult.WON, 30))
    assert kinds(actions) == [ReadSync]
    assert not machine.may_serve(1.0)
    # An answer to a read sent before the win does not count.
    machine.handle(sync_read(1.05, 0.95, None))
    assert machine.phase is Phase.CONFIRMING
    actions = machine.handle(sync_read(1.1, 1.0, SyncRecord(12, OTHER)))
    assert without_register(actions) == [Resign(30)]
    assert not machine.may_serve(1.1) and machine.phase is Phase.FOLLOWER
    # While the key is still seen, the resign is asked again.
    assert Resign(30) in machine.handle(LeaderObserved(1.2, Leader(ME, 30), 31))


def test_a_win_not_confirmed_within_the_lease_is_given_up_and_its_key_resigned() -> None:
    machine = started()
    leader_gone(machine, SyncRecord(5, ME))
    machine.handle(CampaignAnswered(0.2, 0.12, LEASE, CampaignResult.WON, 20))
    machine.handle(EtcdFailed(1.0, Operation.READ_SYNC, "timed out"))
    actions = machine.handle(Tick(2.7))  # the grant was sent at 0: the lease is doubtful
    assert Resign(20) in actions and BecomePrimary not in kinds(actions)
    assert machine.phase is Phase.FOLLOWER and not machine.may_serve(2.7)
    # The record read's late answer makes no primary either.
    assert BecomePrimary not in kinds(machine.handle(sync_read(2.8, 0.3, SyncRecord(5, ME))))


def test_a_failed_read_after_a_win_is_sent_again() -> None:
    """Without it, the member holds the leader key, keeps its lease alive and never
    serves: nobody else may campaign, and the cluster answers nothing."""
    machine = started()
    leader_gone(machine, SyncRecord(5, ME))
    machine.handle(CampaignAnswered(0.2, 0.12, LEASE, CampaignResult.WON, 20))
    machine.handle(EtcdFailed(0.8, Operation.READ_SYNC, "timed out"))
    machine.handle(KeepaliveAnswered(0.95, 0.9, LEASE, 3.0))
    assert ReadSync in kinds(machine.handle(Tick(1.1)))
    assert without_register(machine.handle(sync_read(1.2, 1.1, SyncRecord(5, ME)))) == [
        BecomePrimary(20)
    ]


def test_a_record_newer_than_a_read_that_found_no_leader_makes_it_stale() -> None:
    """No leader as of revision 15, then a record of epoch 16 that names us (our copy,
    in sync with that leader meanwhile, is of 16): the leader of 16 may lead now. A
    campaign would set our floor to 17 (StopFollowing), above the epoch of the very
    primary we then follow: its channel would be refused forever."""
    machine = started(Holding(True, 16, 7, 40))
    machine.handle(LeaderObserved(0.1, None, 15))
    actions = machine.handle(sync_read(0.2, 0.15, SyncRecord(16, ME)))
    assert kinds(actions) == [ReadLeader]
    assert machine.why_not_primary(0.2) == "the leader key has not been read yet"
    actions = machine.handle(LeaderObserved(0.3, Leader(OTHER, 16), 31))
    assert kinds(actions) == [BecomeBackup]


def test_a_late_answer_to_an_older_read_does_not_replace_the_record() -> None:
    machine = started()
    machine.handle(LeaderObserved(0.1, None, 10))
    machine.handle(sync_read(0.5, 0.4, SyncRecord(9, OTHER)))
    machine.handle(sync_read(0.6, 0.05, SyncRecord(5, ME)))  # sent first, answered last
    assert machine.record == SyncRecord(9, OTHER)
    assert OTHER in (machine.why_not_primary(0.6) or "")


def test_an_indeterminate_campaign_is_adopted_when_our_key_shows_up() -> None:
    machine = started()
    leader_gone(machine, SyncRecord(5, ME))
    actions = machine.handle(CampaignAnswered(0.5, 0.12, LEASE, CampaignResult.INDETERMINATE))
    assert kinds(actions) == [ReadLeader]
    assert kinds(machine.handle(LeaderObserved(0.6, Leader(ME, 20), 20))) == [ReadSync]
    actions = machine.handle(sync_read(0.7, 0.6, SyncRecord(5, ME)))
    assert without_register(actions) == [BecomePrimary(20)]


def test_a_key_of_ours_that_we_do_not_lead_under_is_resigned() -> None:
    """Bound to a lease we keep alive, it would block every other member."""
    machine = started()
    machine.handle(LeaderObserved(0.1, Leader(OTHER, 9), 9))
    assert Resign(12) in machine.handle(LeaderObserved(0.2, Leader(ME, 12), 12))


def test_a_restarted_member_resigns_the_key_of_its_dead_run_at_the_same_address() -> None:
    """Holding the address's socket, it knows that run is gone: waiting for the lease to
    run out would keep every member from taking over."""
    machine = Leadership(TIMING)
    machine.handle(Started(0.0, RESTARTED, EMPTY))
    machine.handle(LeaseGranted(0.01, 0.0, LEASE, 3.0))
    actions = machine.handle(LeaderObserved(0.1, Leader(ME, 12), 12))
    assert without_register(actions) == [Resign(12)]  # and it does not follow the dead run
    assert machine.role is Role.SPARE and machine.status(0.1).primary is None
    # A leader elsewhere is followed, its key left alone.
    actions = machine.handle(LeaderObserved(0.2, Leader(OTHER, 14), 14))
    assert Resign not in kinds(actions) and BecomeSpare in kinds(actions)


# -- rule (b): winning -------------------------------------------------------------------------


def test_the_winner_becomes_primary_in_place_and_may_serve() -> None:
    machine = primary(20)
    assert machine.role is Role.PRIMARY and machine.epoch == 20
    assert machine.holding == Holding(True, 20, COPY.history, COPY.seq)
    assert machine.may_serve(1.0)
    status = machine.status(1.0)
    assert (status.role, status.epoch, status.primary, status.why_not_primary) == (
        Role.PRIMARY,
        20,
        ME,
        None,
    )


# -- rule (c): the in-sync record before any acknowledgement -----------------------------------


def test_a_backup_is_recorded_before_any_write_it_acknowledged_is_acknowledged() -> None:
    machine = primary(20)
    actions = machine.handle(BackupInSync(0.3, OTHER))
    # A compare-and-swap on the record as read when the win was confirmed.
    assert without_register(actions) == [RecordSync(20, OTHER, CONFIRMED)]
    assert not machine.may_acknowledge(0.35, OTHER)
    machine.handle(ok(0.4, OTHER, 30))
    assert machine.may_acknowledge(0.45, OTHER)
    assert not machine.may_acknowledge(0.45, THIRD)


def test_a_new_backup_is_recorded_again_and_meanwhile_nothing_is_acknowledged() -> None:
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(ok(0.4, OTHER, 30))
    machine.handle(BackupLost(0.5, OTHER))
    # The next record expects the revision the last one landed at.
    assert without_register(machine.handle(BackupInSync(0.6, THIRD))) == [RecordSync(20, THIRD, 30)]
    # etcd holds OTHER or THIRD until the answer: neither may acknowledge.
    assert not machine.may_acknowledge(0.65, THIRD) and not machine.may_acknowledge(0.65, OTHER)
    machine.handle(ok(0.7, THIRD, 31))
    assert machine.may_acknowledge(0.75, THIRD)


def test_while_a_record_is_on_its_way_the_old_backup_coming_back_acknowledges_nothing() -> None:
    """etcd may already name THIRD: a write acknowledged with OTHER alone would be
    lost if THIRD were then promoted."""
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(ok(0.4, OTHER, 30))
    machine.handle(BackupLost(0.5, OTHER))
    machine.handle(BackupInSync(0.6, THIRD))  # recording THIRD...
    machine.handle(BackupLost(0.7, THIRD))
    machine.handle(BackupInSync(0.8, OTHER))
    assert not machine.may_acknowledge(0.85, OTHER)
    # The answer for THIRD comes; OTHER is recorded again before it acknowledges.
    actions = machine.handle(ok(0.9, THIRD, 31))
    assert RecordSync(20, OTHER, 31) in actions
    assert not machine.may_acknowledge(0.95, OTHER)
    machine.handle(ok(1.0, OTHER, 32))
    assert machine.may_acknowledge(1.05, OTHER)


def test_after_a_record_with_a_lost_answer_the_retry_expects_the_same_revision() -> None:
    """The lost write may land later, but only while the record is at the revision
    it expected: a retry expecting the same one, for whichever backup is in sync by
    then, means that at most one of them ever lands."""
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(ok(0.4, OTHER, 30))
    machine.handle(BackupLost(0.5, OTHER))
    machine.handle(BackupInSync(0.6, THIRD))
    machine.handle(RecordSyncAnswered(1.2, 20, THIRD, RecordResult.FAILED))
    assert not machine.may_acknowledge(1.25, THIRD) and not machine.may_acknowledge(1.25, OTHER)
    machine.handle(BackupLost(1.3, THIRD))
    # Another backup now: no step-down, the same expected revision.
    actions = without_register(machine.handle(BackupInSync(1.35, OTHER)))
    assert actions == [RecordSync(20, OTHER, 30)]
    assert not machine.may_acknowledge(1.45, OTHER)
    machine.handle(ok(1.5, OTHER, 32))
    assert machine.may_acknowledge(1.55, OTHER) and machine.may_serve(1.55)


def test_a_refused_record_steps_down_the_lost_write_may_have_landed_first() -> None:
    """Refused: our key is gone, or a lost write of ours landed first and etcd's
    record is not what we know. Either way the primary hands over (the resign is
    guarded by our epoch: harmless if the key is gone)."""
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(RecordSyncAnswered(1.2, 20, OTHER, RecordResult.FAILED))
    machine.handle(BackupLost(1.3, OTHER))
    assert RecordSync(20, THIRD, CONFIRMED) in machine.handle(BackupInSync(1.35, THIRD))
    actions = without_register(
        machine.handle(RecordSyncAnswered(1.5, 20, THIRD, RecordResult.REFUSED))
    )
    assert kinds(actions) == [Fence, Resign] and actions[1] == Resign(20)
    assert not machine.may_serve(1.5) and not machine.may_acknowledge(1.5, OTHER)


def test_a_lost_backup_is_not_recorded_away_and_acknowledges_at_once_when_back() -> None:
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(ok(0.4, OTHER, 30))
    actions = machine.handle(BackupLost(0.5, OTHER))
    assert RecordSync not in kinds(actions)
    assert not machine.may_acknowledge(0.55, OTHER)
    for at in (0.6, 1.0, 1.5):  # no tick writes "no backup" either
        assert RecordSync not in kinds(machine.handle(Tick(at)))
    assert RecordSync not in kinds(machine.handle(BackupInSync(1.6, OTHER)))
    assert machine.may_acknowledge(1.65, OTHER)


def test_a_promoted_primary_leaves_the_record_that_names_it_until_it_has_a_backup() -> None:
    machine = primary(20, SyncRecord(5, ME))
    for at in (0.3, 0.8, 1.2):
        assert RecordSync not in kinds(machine.handle(Tick(at)))


def test_a_failed_record_is_retried_and_nothing_acknowledged_meanwhile() -> None:
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(RecordSyncAnswered(1.2, 20, OTHER, RecordResult.FAILED))
    assert not machine.may_acknowledge(1.25, OTHER)
    assert RecordSync(20, OTHER, CONFIRMED) in machine.handle(Tick(1.2 + TIMING.retry_delay))
    machine.handle(ok(1.5, OTHER, 30))
    assert machine.may_acknowledge(1.55, OTHER)


def test_the_first_record_of_a_brand_new_cluster_expects_none() -> None:
    machine = primary(20, None)
    assert RecordSync(20, OTHER, 0) in machine.handle(BackupInSync(0.3, OTHER))


def test_an_answer_for_an_earlier_epoch_is_ignored() -> None:
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(ok(0.4, OTHER, 30, epoch=12))
    assert not machine.may_acknowledge(0.45, OTHER)


# -- rule (d): fencing ----------------------------------------------------------------------

FENCES = [
    # (event, words in the reason)
    (Tick(2.7), "lease may have expired"),  # 0 + 3 - 0.3: from when the grant was sent
    (LeaderObserved(1.0, None, 40), "is gone"),
    (LeaderObserved(1.0, Leader(OTHER, 30), 30), f"{OTHER} leads at epoch 30"),
    (LeaderObserved(1.0, Leader(ME, 25), 25), f"{ME} leads at epoch 25"),  # a later key
    (KeepaliveAnswered(1.0, 0.9, LEASE, None), "lease expired at etcd"),
    (RecordSyncAnswered(1.0, 20, OTHER, RecordResult.REFUSED), "refused"),
]


@pytest.mark.parametrize(("event", "words"), FENCES)
def test_the_primary_fences_itself(event: object, words: str) -> None:
    machine = primary(20)
    if isinstance(event, RecordSyncAnswered):
        machine.handle(BackupInSync(0.5, OTHER))
    actions = machine.handle(event)  # type: ignore[arg-type]  # the table holds Events
    fences = [a for a in actions if isinstance(a, Fence)]
    assert len(fences) == 1 and words in fences[0].reason
    assert not machine.may_serve(event.now)  # type: ignore[attr-defined]  # every Event has now
    assert machine.role is Role.SPARE and machine.phase is Phase.FOLLOWER


def test_the_lease_is_measured_from_the_send_time_less_the_margin() -> None:
    assert lease_valid_until(sent=10.0, ttl=3.0, margin=0.3) == pytest.approx(12.7)
    machine = primary(20)
    # A keepalive sent at 1.0 and answered at 1.8: valid until 1.0 + 3 - 0.3.
    machine.handle(KeepaliveAnswered(1.8, 1.0, LEASE, 3.0))
    assert machine.may_serve(3.69) and not machine.may_serve(3.7)
    assert not machine.may_serve(4.79)  # as if measured from the answer: wrong
    # An answer about another lease changes nothing.
    machine.handle(KeepaliveAnswered(2.0, 1.9, LEASE + 1, 3.0))
    assert not machine.may_serve(3.7)


def test_an_older_keepalive_answered_late_does_not_shorten_the_lease() -> None:
    machine = primary(20)
    machine.handle(KeepaliveAnswered(1.1, 1.0, LEASE, 3.0))
    machine.handle(KeepaliveAnswered(1.5, 0.5, LEASE, 3.0))
    assert machine.may_serve(3.69)


def test_a_fenced_primary_follows_the_new_one_and_keeps_its_data() -> None:
    machine = primary(20)
    actions = without_register(machine.handle(LeaderObserved(1.0, Leader(OTHER, 30), 30)))
    assert actions == [Fence(f"{OTHER} leads at epoch 30"), BecomeSpare(OTHER, 30)]
    assert machine.holding.confirmed
    assert machine.accepts(OTHER, 30) and not machine.accepts(ME, 20)


def test_a_primary_whose_key_expired_while_paused_may_campaign_again_as_the_record() -> None:
    machine = primary(20, SyncRecord(5, ME))
    actions = machine.handle(Tick(8.0))  # woke long after its lease
    assert Fence in kinds(actions) and not machine.may_serve(8.0)
    assert kinds(machine.handle(KeepaliveAnswered(8.05, 8.0, LEASE, None))) == [GrantLease]
    machine.handle(LeaseGranted(8.1, 8.0, LEASE + 1, 3.0))
    assert Campaign in kinds(leader_gone(machine, SyncRecord(5, ME), now=8.2, revision=50))


# -- rule (e): etcd unreachable ---------------------------------------------------------------


def test_etcd_unreachable_the_primary_carries_on_until_its_lease_then_fences() -> None:
    machine = primary(20)
    machine.handle(BackupInSync(0.3, OTHER))
    machine.handle(ok(0.4, OTHER, 30))
    assert kinds(machine.handle(Tick(0.95))) == [KeepAlive]
    machine.handle(EtcdFailed(1.8, Operation.KEEPALIVE, "timed out"))
    assert KeepAlive in kinds(machine.handle(Tick(1.8 + TIMING.retry_delay)))
    machine.handle(EtcdFailed(2.5, Operation.KEEPALIVE, "timed out"))
    assert machine.may_acknowledge(2.69, OTHER)  # the grant was sent at 0: until 2.7
    assert not machine.status(2.69).etcd_reachable
    actions = machine.handle(Tick(2.7))
    assert Fence in kinds(actions)
    assert not machine.may_serve(2.7) and not machine.may_acknowledge(2.7, OTHER)
    assert machine.why_not_primary(2.8) == "no valid lease: etcd unreachable"
    assert not machine.on_the_way(machine.why_not_primary(2.8))


def test_etcd_unreachable_sets_no_wakeup_in_the_past() -> None:
    """The driver ticks at ``next_wakeup``: a call on its way past its retry time, or a
    lease that ran out on our clock while its keepalives fail, must not make that a
    time already past (the driver would tick at zero delay until etcd answers)."""
    machine = Leadership(TIMING)
    machine.handle(Started(0.0, ME, COPY))  # the grant is on its way
    machine.handle(Tick(0.5))
    assert machine.next_wakeup() > 0.5
    machine = started()
    machine.handle(Tick(0.95))  # a keepalive is on its way
    machine.handle(Tick(1.9))
    assert machine.next_wakeup() > 1.9
    machine = primary(20)
    assert machine.next_wakeup() <= machine.valid_until  # the primary's fencing deadline
    machine.handle(EtcdFailed(1.8, Operation.KEEPALIVE, "timed out"))
    machine.handle(Tick(2.7))  # fenced: the lease sent at 0 ran out at 2.7
    machine.handle(EtcdFailed(2.8, Operation.KEEPALIVE, "timed out"))
    assert machine.lease is not None and machine.valid_until <= 2.8
    assert machine.next_wakeup() > 2.8


def test_keepalives_follow_patronis_rule() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Timing(ttl=3.0, margin=0.3, keepalive_interval=1.0, request_timeout=1.0)
    timing = Timing.for_ttl(3.0)
    assert timing.keepalive_interval + 2 * timing.request_timeout + timing.margin <= 3.0 + 1e-9
    machine = started()
    assert kinds(machine.handle(Tick(0.5))) == []
    assert kinds(machine.handle(Tick(0.91))) == [KeepAlive]
    assert kinds(machine.handle(Tick(1.0))) == []  # one on its way at a time


def test_a_gone_lease_is_granted_again() -> None:
    machine = started()
    actions = machine.handle(KeepaliveAnswered(1.0, 0.9, LEASE, None))
    assert kinds(actions) == [GrantLease]
    assert machine.why_not_primary(1.0) == "no lease yet"
    # A step on the way to leading, not a reason against it (the driver logs only those).
    assert machine.on_the_way(machine.why_not_primary(1.0))


# -- rule (f) and the epoch ------------------------------------------------------------------


def test_nobody_to_promote_every_member_says_why() -> None:
    gone = member_name("10.0.0.9:7000", "z")
    for holding in (COPY, EMPTY):
        machine = started(holding)
        leader_gone(machine, SyncRecord(40, gone), revision=45)
        for at in (0.5, 0.95, 1.5):
            actions = machine.handle(Tick(at))
            assert Campaign not in kinds(actions)
            if KeepAlive in kinds(actions):
                machine.handle(KeepaliveAnswered(at + 0.01, at, LEASE, 3.0))
        why = machine.status(1.5).why_not_primary or ""
        assert f"only {gone}" in why and "epoch 40" in why
        assert not machine.on_the_way(why)


STALE = [
    # (the leader seen first, then a stale observation that must be ignored)
    (LeaderObserved(0.1, Leader(OTHER, 30), 30), LeaderObserved(0.2, Leader(THIRD, 12), 12)),
    (LeaderObserved(0.1, Leader(OTHER, 30), 35), LeaderObserved(0.2, None, 31)),
]


@pytest.mark.parametrize(("first", "stale"), STALE)
def test_stale_leader_news_is_ignored(first: LeaderObserved, stale: LeaderObserved) -> None:
    machine = started()
    machine.handle(first)
    assert kinds(machine.handle(stale)) == []
    assert machine.following is not None and machine.following[1:] == (OTHER, 30)
    assert not machine.accepts(THIRD, 12)


def test_a_record_newer_than_the_known_leader_makes_it_stale() -> None:
    machine = started()
    machine.handle(LeaderObserved(0.1, Leader(OTHER, 3), 3))
    actions = machine.handle(sync_read(0.3, 0.2, SyncRecord(15, THIRD)))
    assert kinds(actions) == [ReadLeader]
    assert not machine.accepts(OTHER, 3)


def test_a_follower_is_the_backup_when_the_record_names_it_under_the_leaders_epoch() -> None:
    machine = started()
    actions = machine.handle(LeaderObserved(0.1, Leader(OTHER, 30), 30))
    assert without_register(actions) == [BecomeSpare(OTHER, 30)]
    actions = machine.handle(sync_read(0.3, 0.2, SyncRecord(30, ME)))
    assert without_register(actions) == [BecomeBackup(OTHER, 30)]
    assert machine.status(0.3).role is Role.BACKUP


def test_copy_changes_reach_eligibility() -> None:
    machine = started(COPY)
    machine.handle(LeaderObserved(0.1, Leader(OTHER, 30), 30))
    machine.handle(CopyChanged(0.2, EMPTY))  # a full transfer began
    actions = leader_gone(machine, SyncRecord(30, ME), now=0.3)
    assert Campaign not in kinds(actions)


def test_a_graceful_stop_fences_resigns_and_revokes() -> None:
    machine = primary(20)
    actions = without_register(machine.handle(Stop(1.0)))
    assert actions == [Fence("stopping"), Resign(20), RevokeLease(LEASE)]
    assert machine.handle(Tick(1.1)) == []


def test_registration_follows_the_status() -> None:
    machine = primary(20)
    machine.handle(LeaderObserved(1.0, Leader(OTHER, 30), 30))
    registered = machine.registered or {}
    assert registered["role"] == "spare" and registered["primary"] == OTHER
    assert registered["epoch"] == 30
