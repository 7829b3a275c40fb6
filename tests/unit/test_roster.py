"""``pbkv cluster``'s rows and table from statuses (pbkv/roster.py), without servers."""

from __future__ import annotations

from pbkv.roster import Entry, Row, rows, table

PRIMARY = ("127.0.0.1", 8080)
BACKUP = ("127.0.0.2", 8080)
SPARE = ("127.0.0.3", 8080)


def pair_entries() -> list[Entry]:
    """A pair without a coordinator: no lease, no in-sync names."""
    return [
        Entry(PRIMARY, None, {"role": "primary", "stage": "in_sync", "epoch": 0, "lag": 0}),
        Entry(BACKUP, None, {"role": "backup", "stage": "in_sync", "epoch": 0, "lag": 0}),
    ]


def test_a_pair_without_a_coordinator() -> None:
    assert rows(pair_entries()) == [
        Row("127.0.0.1:8080", None, True, "primary", "in_sync", 0, None, 0, None),
        Row("127.0.0.2:8080", None, True, "backup", "in_sync", 0, True, 0, None),
    ]


def test_a_pair_backup_not_in_sync_yet() -> None:
    entries = pair_entries()
    entries[1] = Entry(BACKUP, None, {"role": "backup", "stage": "bootstrapping", "lag": 3})
    assert rows(entries)[1].in_sync is False


def member_entries(in_sync: str | None, recorded: str | None) -> list[Entry]:
    primary = {
        "role": "primary",
        "stage": "in_sync",
        "member": "127.0.0.1:8080#aa",
        "epoch": 41,
        "lease_left": 2.25,
        "in_sync_backup": in_sync,
        "recorded_backup": recorded,
        "lag": 0,
    }
    backup = {"role": "backup", "stage": "in_sync", "member": "127.0.0.2:8080#bb", "epoch": 41}
    spare = {"role": "spare", "stage": "cold_start", "member": "127.0.0.3:8080#cc", "epoch": 41}
    return [
        Entry(PRIMARY, {"role": "primary"}, primary, "127.0.0.1:8080#aa"),
        Entry(BACKUP, {"role": "backup"}, {**backup, "lease_left": 1.0, "lag": 2}),
        Entry(SPARE, {"role": "spare"}, spare, "127.0.0.3:8080#cc"),
    ]


def test_members_in_sync_are_the_ones_the_primary_names() -> None:
    listed = rows(member_entries("127.0.0.2:8080#bb", "127.0.0.2:8080#bb"))
    assert [row.in_sync for row in listed] == [None, True, False]
    assert listed[0] == Row(
        "127.0.0.1:8080", "127.0.0.1:8080#aa", True, "primary", "in_sync", 41, None, 0, 2.25
    )
    assert listed[1].member == "127.0.0.2:8080#bb"  # from its status
    assert (listed[1].lag, listed[1].lease_left) == (2, 1.0)


def test_the_recorded_backup_counts_as_in_sync() -> None:
    listed = rows(member_entries(None, "127.0.0.3:8080#cc"))
    assert [row.in_sync for row in listed] == [None, False, True]


def test_a_primary_naming_nobody_has_no_member_in_sync() -> None:
    """Its stage says in_sync, but only the primary's word counts with a coordinator."""
    assert [row.in_sync for row in rows(member_entries(None, None))] == [None, False, False]


def test_a_member_that_does_not_answer_is_unreachable_with_what_etcd_says() -> None:
    entries = [Entry(SPARE, {"role": "spare", "epoch": 7}, None, "127.0.0.3:8080#cc")]
    assert rows(entries) == [
        Row("127.0.0.3:8080", "127.0.0.3:8080#cc", False, "spare", None, 7, None, None, None)
    ]
    assert rows([Entry(SPARE, None, None)])[0].role is None


def test_odd_status_fields_are_missing_not_errors() -> None:
    status = {"role": 3, "stage": None, "epoch": True, "lag": "x", "lease_left": "soon"}
    assert rows([Entry(PRIMARY, None, status)]) == [
        Row("127.0.0.1:8080", None, True, None, None, None, None, None, None)
    ]


def test_an_ipv6_address_is_bracketed() -> None:
    assert rows([Entry(("::1", 80), None, None)])[0].address == "[::1]:80"


def test_the_table_is_patronictl_like() -> None:
    listed = rows(member_entries("127.0.0.2:8080#bb", "127.0.0.2:8080#bb"))
    listed.append(Row("127.0.0.4:8080", None, False, None, None, None, None, None, None))
    assert table(listed, "pbkv").splitlines() == [
        "+ Cluster: pbkv -+---------+-------------+-------+---------+-----+------------+",
        "| Member         | Role    | Stage       | Epoch | In sync | Lag | Lease left |",
        "+----------------+---------+-------------+-------+---------+-----+------------+",
        "| 127.0.0.1:8080 | primary | in_sync     | 41    | -       | 0   | 2.2s       |",
        "| 127.0.0.2:8080 | backup  | in_sync     | 41    | yes     | 2   | 1.0s       |",
        "| 127.0.0.3:8080 | spare   | cold_start  | 41    | no      | -   | -          |",
        "| 127.0.0.4:8080 | -       | unreachable | -     | -       | -   | -          |",
        "+----------------+---------+-------------+-------+---------+-----+------------+",
    ]


def test_a_long_title_still_closes_its_line() -> None:
    top = table(rows(pair_entries()), "x" * 200).splitlines()[0]
    assert top.startswith("+ Cluster: xxx") and top.endswith(" +")


def test_rows_as_json() -> None:
    assert rows(pair_entries())[1].as_json() == {
        "address": "127.0.0.2:8080",
        "member": None,
        "reachable": True,
        "role": "backup",
        "stage": "in_sync",
        "epoch": 0,
        "in_sync": True,
        "lag": 0,
        "lease_left": None,
    }


def test_a_following_spare_lags_by_what_it_lacks_of_the_backups_batches() -> None:
    entries = member_entries("127.0.0.2:8080#bb", "127.0.0.2:8080#bb")
    status = entries[2].status
    assert status is not None
    entries[2] = Entry(SPARE, {"role": "spare"}, {**status, "lag": 0, "follow_lag": 3})
    assert rows(entries)[2].lag == 3
