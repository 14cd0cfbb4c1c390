# Runs mpi_deadline_main under mpiexec and checks the expected outcome: exit code 3 (MPI_Abort after
# the deadline was detected as expected), the PASSED line, and the named error from rank 0.
# Usage: cmake -DMPIEXEC=... -DNP=... -DBINARY=... [-DMODE=symmetric] -P check_mpi_deadline.cmake
if(NOT DEFINED MODE)
  set(MODE alltoallv)
endif()
execute_process(
  COMMAND ${MPIEXEC} -n ${NP} --allow-run-as-root --oversubscribe --mca mpi_yield_when_idle 1
          ${BINARY} ${MODE}
  RESULT_VARIABLE rc
  OUTPUT_VARIABLE out
  ERROR_VARIABLE err
  TIMEOUT 60)
message("${out}")
math(EXPR missing "${NP} - 1")
if(MODE STREQUAL "symmetric")
  set(expected "rank 0: DEADLINE_EXCEEDED: symmetric fence #2 deadline 1.0 s exceeded on rank 0: ranks [${missing}] did not signal")
else()
  set(expected "rank 0: DEADLINE_EXCEEDED: alltoallv #2 deadline 1.0 s exceeded on rank 0: ranks [${missing}] did not arrive")
endif()
string(FIND "${out}" "${expected}" at)
if(NOT rc EQUAL 3)
  message(FATAL_ERROR "expected exit code 3 (MPI_Abort after the expected deadline), got '${rc}'\n${err}")
endif()
if(at EQUAL -1)
  message(FATAL_ERROR "output lacks: ${expected}")
endif()
string(FIND "${out}" "MPI DEADLINE TEST PASSED" passed)
if(passed EQUAL -1)
  message(FATAL_ERROR "output lacks the PASSED line")
endif()
