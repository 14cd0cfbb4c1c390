// Flag parsing shared by the command-line tools (CLI11): bad flags are input errors, exit code 2,
// like a bad config; --help exits 0.
#pragma once

#include <CLI/CLI.hpp>

namespace moe::launch {

// Parses argv into `app`. Returns -1 to go on, or the exit code after printing help (0) or
// CLI11's message naming the flag and the rule (2).
inline int ParseFlags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return -1;
}

}  // namespace moe::launch
