@ssh
Feature: Running a prompt on the pool
  `rbee infer` places a prompt on a host where the model fits, gets the model there,
  starts a worker if none serves it, and streams the answer to stdout as it is generated.
  Hosts are reached over plain SSH: nothing runs on them between commands, and rbee itself
  is all they need installed.

  (The test model is tiny and predictable: after "Hello" it spells "pqrstuvwxyz abc…",
  after a "!" it says "KO" and stops.)

  Background:
    Given a pool of 2 hosts reached over SSH
    And the controller's catalog names "tiny", served by the Hugging Face hub

  Scenario: Cold start on a remote host
    When I run `rbee infer --model tiny --prompt "Hello" --max-tokens 8 --format json`
    Then it succeeds
    And the answer is "pqrstuvw"
    And it took the cold path: status of every host, a download and a new worker
    And the placement names the host it chose and why the other was not chosen

  Scenario: Warm start needs no SSH at all
    Given a prompt for "tiny" has already run
    And every host's SSH server is stopped
    When I run `rbee infer --model tiny --prompt "Hello" --max-tokens 5 --format json`
    Then it succeeds
    And the answer is "pqrst"
    And it took the warm path, straight to the known worker

  Scenario: A worker that crashes mid-stream ends the command, keeping what arrived
    Given a prompt for "tiny" has already run
    When I start `rbee infer --model tiny --prompt "Hello" --max-tokens 30000`
    And the first tokens have arrived on stdout
    And the worker serving "tiny" is killed
    Then it fails with exit code 1 and "WORKER_CRASHED"
    And stdout still holds the partial answer

  Scenario: Ctrl+C cancels the job on the worker
    Given a prompt for "tiny" has already run
    When I start `rbee infer --model tiny --prompt "Hello" --max-tokens 30000`
    And the first tokens have arrived on stdout
    And I press Ctrl+C
    Then it fails with exit code 130 and "CANCELLED"
    And the worker is ready for the next job

  Scenario: A busy worker sends the next job elsewhere
    Given a prompt for "tiny" has already run
    When I start `rbee infer --model tiny --prompt "Hello" --max-tokens 30000`
    And the first tokens have arrived on stdout
    And I run `rbee infer --model tiny --prompt "Hi!" --max-tokens 5 --format json`
    Then it succeeds
    And the answer is "KO"
    And it ran on a second worker, because the first one was busy

  Scenario: Nothing fits, and every host says why
    Given every host keeps 1000000000 MiB in reserve
    When I run `rbee infer --model tiny --prompt "Hello" --format json`
    Then it fails with exit code 1 and "INSUFFICIENT_RAM"
    And the error lists each host with what it needs and what it has
