"""Which user holds which sockets on this instance."""

from __future__ import annotations

from collections.abc import Iterable


class SocketState:
    """Maps socket ids to users and back; anonymous sockets have no user."""

    def __init__(self) -> None:
        self._user_of: dict[str, str | None] = {}
        self._sids_of: dict[str, set[str]] = {}

    def add(self, sid: str, user_id: str | None) -> bool:
        """Record a socket; True when it is its user's first on this instance."""
        if sid in self._user_of:
            raise ValueError(f"socket {sid} is already registered")
        self._user_of[sid] = user_id
        if user_id is None:
            return False
        sids = self._sids_of.get(user_id)
        if sids is None:
            self._sids_of[user_id] = {sid}
            return True
        sids.add(sid)
        return False

    def remove(self, sid: str) -> tuple[str | None, bool]:
        """Forget a socket; return its user and whether that was the user's last socket here."""
        if sid not in self._user_of:
            return None, False
        user_id = self._user_of.pop(sid)
        if user_id is None:
            return None, False
        sids = self._sids_of[user_id]
        sids.discard(sid)
        if sids:
            return user_id, False
        del self._sids_of[user_id]
        return user_id, True

    def __contains__(self, sid: object) -> bool:
        return sid in self._user_of

    def __len__(self) -> int:
        return len(self._user_of)

    def user_of(self, sid: str) -> str | None:
        return self._user_of.get(sid)

    def holds_user(self, user_id: str) -> bool:
        return user_id in self._sids_of

    def sids_of(self, user_id: str) -> Iterable[str]:
        return self._sids_of.get(user_id, ())

    def all_sids(self) -> Iterable[str]:
        return self._user_of.keys()

    def authenticated_sids(self) -> Iterable[str]:
        for sids in self._sids_of.values():
            yield from sids

    def users(self) -> list[str]:
        return list(self._sids_of)
