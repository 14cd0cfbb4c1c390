# The layering check (cmake/check_layering.cmake) must fail on a deliberate violation: writes a
# runtime/ tree under WORK with one file that includes an NCCL backend header and one that includes
# <mpi.h>, runs the check on it and expects a failure naming both files.
#   cmake -DCHECK=<cmake/check_layering.cmake> -DWORK=<scratch dir> -P check_violation_caught.cmake
file(REMOVE_RECURSE "${WORK}")
file(WRITE "${WORK}/runtime/moe/ok.cc" "#include \"comm/communicator.h\"\n")
file(WRITE "${WORK}/runtime/train/uses_nccl.cc" "#include \"comm/nccl/nccl_communicator.h\"\n")
file(WRITE "${WORK}/runtime/sim/uses_mpi.h" "  #  include <mpi.h>\n")
execute_process(COMMAND ${CMAKE_COMMAND} -DROOT=${WORK} -P ${CHECK}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "the layering check passed a tree that includes comm/nccl/ and mpi.h")
endif()
foreach(name runtime/train/uses_nccl.cc runtime/sim/uses_mpi.h)
  string(FIND "${err}" "${name}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the layering check did not name ${name}:\n${err}")
  endif()
endforeach()
string(FIND "${err}" "runtime/moe/ok.cc" at)
if(NOT at EQUAL -1)
  message(FATAL_ERROR "the layering check named a file without a backend include:\n${err}")
endif()
message(STATUS "layering check caught both violations")
