"""Errors the controller raises; codes from DESIGN.md §5."""

from __future__ import annotations

from rbee_common.errors import RbeeError


class UnknownHost(RbeeError):
    """The host is not in hosts.toml."""

    code = "UNKNOWN_HOST"
    default_hint = ("List hosts with `rbee hosts list`; add one with "
                    "`rbee hosts add NAME --ssh USER@HOST`.")


class HostUnreachable(RbeeError):
    """No SSH connection could be made (down, refused, timed out, unresolvable)."""

    code = "HOST_UNREACHABLE"
    default_hint = "Is the host up and sshd running? Try `ssh HOST` by hand."


class RemoteKilled(RbeeError):
    """An rbee-hive command over SSH ended without an exit status while the connection
    stayed up: killed by a signal (paramiko drops SSH's exit-signal); details: its stderr."""

    code = "REMOTE_KILLED"


class SshAuthFailed(RbeeError):
    """The SSH server refused every key offered."""

    code = "SSH_AUTH_FAILED"
    default_hint = ("Check that your key is in the host's ~/.ssh/authorized_keys and that "
                    "`ssh HOST` logs in without a password.")


class HostKeyUnknown(RbeeError):
    """The host's SSH key is not in known_hosts: refused, as OpenSSH would."""

    code = "HOST_KEY_UNKNOWN"


class HostKeyMismatch(RbeeError):
    """The host's SSH key differs from known_hosts: possibly someone in the middle."""

    code = "HOST_KEY_MISMATCH"
    default_hint = ("If the host was reinstalled, remove its old line with `ssh-keygen -R HOST`; "
                    "otherwise do not connect.")


class HiveNotInstalled(RbeeError):
    """rbee-hive could not be run on the host."""

    code = "HIVE_NOT_INSTALLED"


class SchemaMismatch(RbeeError):
    """The host's rbee-hive speaks another JSON schema version."""

    code = "SCHEMA_MISMATCH"


class NoPlacement(RbeeError):
    """No host can run the job; details list each candidate's reason."""

    code = "NO_PLACEMENT"




class PreflightFailed(RbeeError):
    """The host lacks something the install needs; details list each missing piece and the
    command that fixes it on that host's OS. Nothing was changed."""

    code = "PREFLIGHT_FAILED"


class InstallFailed(RbeeError):
    """Installing rbee on a host failed; the message carries the last lines of its output."""

    code = "INSTALL_FAILED"


class TunnelFailed(RbeeError):
    """A tunnel to an RPC lender could not be set up through SSH."""

    code = "TUNNEL_FAILED"
    default_hint = ("The host's sshd must allow TCP forwarding (AllowTcpForwarding yes, the "
                    "default); check it with `rbee hosts check NAME`.")
