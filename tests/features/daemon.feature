@ssh
Feature: A pool daemon on a host
  A host may run rbee-hive as a daemon. Started from the controller, it listens where the
  controller reaches the host's workers and the controller talks to it over HTTP instead of
  SSH; it watches its workers and tells a queen about them. When it stops, nothing breaks:
  the controller reaches the host over SSH again, as if it had never run.

  (The test model is tiny and predictable: after "Hello" it spells "pqrstuvwxyz abc…".)

  Background:
    Given a pool of 1 host reached over SSH
    And the controller's catalog names "tiny", served by the Hugging Face hub
    And I started a pool daemon on "h1" from the controller

  Scenario: A host with a pool daemon needs no SSH, and gets it back when the daemon stops
    Given every host's SSH server is stopped
    When I run `rbee infer --model tiny --prompt "Hello" --max-tokens 5 --format json`
    Then it succeeds
    And the answer is "pqrst"
    And the pool daemon on "h1" started the worker
    When every host's SSH server is started again
    And the pool daemon on "h1" is stopped on the host itself
    And I run `rbee pool status --format json`
    Then it succeeds
    And "h1" reports the worker that answered

  Scenario: A worker that dies is marked dead by its host's daemon, without anyone asking
    Given a prompt for "tiny" has already run
    When the worker serving "tiny" dies
    Then within 3 seconds its record on "h1" says it is dead
    And rbee workers list shows it dead with the reason
