# The layering check (cmake/check_layering.cmake) must fail on deliberate violations: writes a
# source tree under WORK with a file that includes an NCCL backend header, one that includes
# <mpi.h>, one whose include runs up a floor (routing -> layer) and a benchmark that includes a
# main's header; runs the check on it and expects a failure naming all four, and not the clean file.
#   cmake -DCHECK=<cmake/check_layering.cmake> -DWORK=<scratch dir> -P check_violation_caught.cmake
file(REMOVE_RECURSE "${WORK}")
file(WRITE "${WORK}/runtime/layer/ok.cc"
     "#include \"comm/communicator.h\"\n#include \"runtime/exchange/expert_exchange.h\"\n")
file(WRITE "${WORK}/runtime/train/uses_nccl.cc" "#include \"comm/nccl/nccl_communicator.h\"\n")
file(WRITE "${WORK}/runtime/sim/uses_mpi.h" "  #  include <mpi.h>\n")
file(WRITE "${WORK}/runtime/routing/upward.cc" "#include \"runtime/layer/moe_layer.h\"\n")
file(WRITE "${WORK}/bench/uses_launch.cc" "#include \"launch/cli.h\"\n")
execute_process(COMMAND ${CMAKE_COMMAND} -DROOT=${WORK} -P ${CHECK}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "the layering check passed a tree with four violations")
endif()
foreach(name runtime/train/uses_nccl.cc runtime/sim/uses_mpi.h runtime/routing/upward.cc
             bench/uses_launch.cc)
  string(FIND "${err}" "${name}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the layering check did not name ${name}:\n${err}")
  endif()
endforeach()
string(FIND "${err}" "runtime/layer/ok.cc" at)
if(NOT at EQUAL -1)
  message(FATAL_ERROR "the layering check named a file without a violation:\n${err}")
endif()
message(STATUS "layering check caught all four violations")
