Feature: Getting models onto a host
  `rbee-hive models download` fetches a GGUF from Hugging Face (hf:ORG/REPO/FILE.gguf), from
  any https:// address, or by its catalog id. A download that is cut off resumes where it
  stopped; a file is verified before it is registered, and a failure registers nothing.
  A model published in several files (NAME-00001-of-00003.gguf …) is named by any of them
  and fetched, verified and registered as one model.

  Background:
    Given the Hugging Face hub serves "rbee-test/Tiny-GGUF/tiny.gguf"

  Scenario: An interrupted download resumes where it stopped
    Given the hub will drop the connection after 200000 bytes
    And dropped downloads are not retried
    When I run `rbee-hive models download hf:rbee-test/Tiny-GGUF/tiny.gguf --format json`
    Then it fails with exit code 1 and "DOWNLOAD_FAILED"
    And the hint says "resume"
    When dropped downloads are retried again
    And I run `rbee-hive models download hf:rbee-test/Tiny-GGUF/tiny.gguf --format json`
    Then it succeeds
    And it resumed from byte 200000 and transferred only the rest

  Scenario: A model published in several files is fetched whole and runs as one
    Given the Hugging Face hub serves the tiny model in 3 files in "rbee-test/Split-GGUF"
    When I run `rbee-hive models download hf:rbee-test/Split-GGUF/tiny-00002-of-00003.gguf --format json`
    Then it succeeds
    And one model "tiny" is registered, made of 3 files
    When I run `rbee infer --model tiny --prompt "Hello" --max-tokens 8 --format json`
    Then the answer is "pqrstuvw"

  Scenario: A model with one of its files missing is refused
    Given the Hugging Face hub serves the tiny model in 3 files in "rbee-test/Split-GGUF", all but the second
    When I run `rbee-hive models download hf:rbee-test/Split-GGUF/tiny-00001-of-00003.gguf`
    Then it fails with exit code 1 and "SHARD_MISSING"
    And the hint says "gguf-split"
    And no model is registered

  Scenario: A model that does not exist
    When I run `rbee-hive models download hf:rbee-test/Tiny-GGUF/missing.gguf`
    Then it fails with exit code 1 and "MODEL_NOT_FOUND"
    And the hint says "huggingface.co/rbee-test/Tiny-GGUF/tree/main"
    And no model is registered

  Scenario: A file whose checksum is wrong is discarded
    Given my catalog says "tiny" is "hf:rbee-test/Tiny-GGUF/tiny.gguf" with sha256 "00…00"
    When I run `rbee-hive models download tiny --format json`
    Then it fails with exit code 1 and "CHECKSUM_MISMATCH"
    And the error gives the expected and the actual sha256
    And no model is registered

  Scenario: A model too big for the memory says what it needs and what would fit
    Given "tiny" is on this host
    When I spawn "tiny" on the CPU with a context whose KV cache alone exceeds this machine's RAM
    Then it fails with exit code 1 and "INSUFFICIENT_RAM"
    And the error gives the required and the available bytes
    And it suggests "--ctx 32768"

  Scenario Outline: A model reference that is not one is refused before anything runs
    When I run `rbee-hive models download '<reference>' --format json`
    Then it fails with exit code 1 and "INVALID_MODEL_REF"
    And nothing was downloaded and no command ran

    Examples:
      | reference                          |
      | ../../etc/passwd                   |
      | hf:rbee-test/Tiny-GGUF/../x.gguf   |
      | $(touch rbee-pwned)                |
      | tiny; touch rbee-pwned             |
      | `touch rbee-pwned`                 |
      | http://example.com/plain-http.gguf |
