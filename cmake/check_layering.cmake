# The layering rule of DESIGN §2 that a compiler cannot see: no file under runtime/ names the MPI
# or NCCL backend (mpi.h, nccl.h, comm/mpi/, comm/nccl/); the runtime is handed communicators.
# Run at configure time (CMakeLists.txt) and as the ctest `layering_check`:
#   cmake -DROOT=<source dir> -P cmake/check_layering.cmake
# Fails (FATAL_ERROR) naming every offending file and line.
if(NOT ROOT)
  message(FATAL_ERROR "check_layering.cmake: pass -DROOT=<source directory>")
endif()
file(GLOB_RECURSE moe_layering_files LIST_DIRECTORIES false
     "${ROOT}/runtime/*.h" "${ROOT}/runtime/*.cc" "${ROOT}/runtime/*.cu")
set(moe_layering_bad "")
foreach(f IN LISTS moe_layering_files)
  file(STRINGS "${f}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"]((mpi|nccl)\\.h|comm/(mpi|nccl)/)")
  foreach(line IN LISTS lines)
    file(RELATIVE_PATH rel "${ROOT}" "${f}")
    string(APPEND moe_layering_bad "\n  ${rel}: ${line}")
  endforeach()
endforeach()
if(moe_layering_bad)
  message(FATAL_ERROR "layering: runtime/ must not name the MPI or NCCL backend (DESIGN §2: it is "
                      "handed a Communicator, or a factory from comm/world.h):${moe_layering_bad}")
endif()
