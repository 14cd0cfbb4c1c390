// CHECK macros: for programmer errors only (violated invariants), never for user input.
// User input errors are returned as Status values.
#pragma once

#include <cstdio>
#include <cstdlib>

#define MOE_CHECK(cond)                                                             \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)

#define MOE_CHECK_MSG(cond, msg)                                                          \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: check failed: %s (%s)\n", __FILE__, __LINE__, #cond, \
                   (msg));                                                                \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

// Aborts with the Status message when a Status-returning call fails where failure is a bug.
#define MOE_CHECK_OK(expr)                                                              \
  do {                                                                                  \
    ::moe::Status moe_check_status_ = (expr);                                           \
    if (!moe_check_status_.ok()) {                                                      \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__,                           \
                   moe_check_status_.ToString().c_str());                               \
      std::abort();                                                                     \
    }                                                                                   \
  } while (0)
