"""What the failover tests with real members share: a writer that records every
answer, and the check that nothing acknowledged was lost."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pbkv.client import Client, NotPrimary, PbkvError, Unavailable
from pbkv.testing.members import LocalMembers


def start_three(members: LocalMembers) -> int:
    for index in range(3):
        members.start(index)
    return members.wait_writable()


@dataclass
class Writer:
    """Inserts ``w<n>`` keys one after another into whichever member is primary."""

    members: LocalMembers
    acknowledged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # applied nowhere, by the spec
    indeterminate: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def wait_acknowledged(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.acknowledged) + count
        while len(self.acknowledged) < target:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} writes acknowledged"
            time.sleep(0.01)

    def _run(self) -> None:
        number = 0
        client: Client | None = None
        while not self.stop.is_set():
            if client is None:
                primary = self.members.primary()
                if primary is None:
                    time.sleep(0.01)
                    continue
                client = self.members.client(primary, timeout=2.0)
            key = f"w{number}"
            number += 1
            try:
                client.insert(key, "v")
            except (NotPrimary, Unavailable):
                self.refused.append(key)
                client.close()
                client = None
            except (OSError, PbkvError):
                # "replication failed", or the connection died: it may have been applied.
                self.indeterminate.append(key)
                client.close()
                client = None
            else:
                self.acknowledged.append(key)
        if client is not None:
            client.close()


def check_no_loss(members: LocalMembers, primary: int, writer: Writer) -> None:
    with members.client(primary, timeout=10.0) as client:
        data = dict(client.dump())
    lost = [key for key in writer.acknowledged if key not in data]
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    visible = [key for key in writer.refused if key in data]
    assert not visible, f"refused writes visible: {visible[:5]}"
