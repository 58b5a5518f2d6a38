@ssh
Feature: One always-on endpoint for the whole lab
  `rbee queen start` runs the queen on the controller. Any OpenAI client pointed at it asks
  for a model by name; the queen places the job on the pool, downloads the model and starts
  a worker where needed, streams the answer back, and keeps the worker warm for the next
  request. Jobs and their placements stay on record.

  (The test model is tiny and predictable: after "Hello" it spells "pqrstuvwxyz abc…".)

  Background:
    Given a pool of 2 hosts reached over SSH
    And the controller's catalog names "tiny", served by the Hugging Face hub
    And the queen is running

  Scenario: An OpenAI client asks the queen for a model no host has yet
    When an OpenAI client asks the queen to complete "Hello" with "tiny" in 5 tokens
    Then the answer is "pqrst"
    And the job's events say it was placed, downloaded, loaded and started
    And `rbee jobs list` shows the job done on the host it was placed on
    When an OpenAI client asks the queen to complete "Hello" with "tiny" in 3 tokens
    Then the answer is "pqr"
    And that job ran on the worker that was already warm

  Scenario: The queen comes back after a crash with its history
    Given the queen has answered a job
    When the queen is killed and started again
    Then `rbee jobs list` still shows that job done
    And `rbee infer` through the queen still answers "Hello" with "pqrst"
