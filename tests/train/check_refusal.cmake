# A tool run that must be refused as bad input: exit code 2 and TEXT in what it printed.
#   cmake -DTOOL=<tool> -DARGS=<;-list> -DTEXT=<expected text> -P check_refusal.cmake
execute_process(COMMAND ${TOOL} ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT 50)
string(FIND "${out}${err}" "${TEXT}" at)
if(NOT rc EQUAL 2 OR at EQUAL -1)
  message(FATAL_ERROR "expected exit code 2 and '${TEXT}'; got exit ${rc}:\n${out}${err}")
endif()
message(STATUS "refused as expected: ${err}")
