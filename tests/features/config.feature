@ssh
Feature: The pool, its hosts and their configuration
  The hosts live in ~/.config/rbee/hosts.toml; every command that talks to many hosts asks
  them all at once, reports each host's own result, and exits 3 when only some answered.

  Scenario: A host that is down does not stop the others
    Given a pool of 3 hosts reached over SSH
    And the SSH server of "h2" is stopped
    When I run `rbee pool status --format json`
    Then it fails with exit code 3 and "partial"
    And "h1" and "h3" report their status
    And "h2" reports "HOST_UNREACHABLE"

  Scenario: An unknown host key is refused until I accept it
    Given a pool of 1 host reached over SSH whose host key I have never seen
    When I run `rbee hosts check h1 --format json`
    Then it fails with exit code 1 and "HOST_KEY_UNKNOWN"
    And the error shows the key's SHA256 fingerprint
    When I run `rbee hosts check h1 --accept-new-host-key --format json`
    Then it succeeds
    And the key is now in known_hosts

  Scenario: A malformed hosts.toml names the file and the line
    Given hosts.toml contains:
      """
      [hosts.mac]
      ssh = "vince@mac.home.arpa"

      [hosts.pc]
      transport = "telnet"
      """
    When I run `rbee pool status --format json`
    Then it fails with exit code 1 and "CONFIG_INVALID"
    And the error points at hosts.toml line 5

  Scenario: A malformed catalog.toml names the file and the line
    Given catalog.toml contains:
      """
      [[models]]
      id = "mine"
      name = "Mine
      """
    When I run `rbee-hive models catalog --format json`
    Then it fails with exit code 1 and "CONFIG_INVALID"
    And the error points at catalog.toml line 3
