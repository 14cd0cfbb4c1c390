# The dependency direction of docs/ARCHITECTURE.md "Layout", checked on the sources (a compiler
# cannot see it: every target shares one include root). Bottom up:
#   base -> {experts, comm} -> runtime/config -> runtime/routing -> runtime/device
#        -> runtime/exchange -> runtime/layer -> runtime/train -> runtime/sim
#        -> {bench, python} -> launch   (moe_comm_bench is a main over bench/'s cases)
# Each folder may include only itself and the folders below it (plus proto/). On top of that,
# runtime/ never names a communicator backend (mpi.h, nccl.h, comm/mpi/, comm/nccl/,
# comm/loopback/): it is handed a Communicator, or a factory from comm/world.h; benchmarks do not
# include the mains (launch/), and nothing includes a benchmark.
# Run at configure time (CMakeLists.txt) and as the ctest `layering_check`:
#   cmake -DROOT=<source dir> -P cmake/check_layering.cmake
# Fails (FATAL_ERROR) naming every offending file and line.
if(NOT ROOT)
  message(FATAL_ERROR "check_layering.cmake: pass -DROOT=<source directory>")
endif()

# Folder -> the include prefixes its files may use, lowest folders first. A file belongs to the
# longest folder that prefixes its path.
set(moe_below_base "base/")
set(moe_allowed_base "${moe_below_base}")
set(moe_allowed_experts "experts/;${moe_below_base}")
set(moe_allowed_comm "comm/;${moe_below_base}")
set(moe_below_config "proto/;experts/;comm/;${moe_below_base}")
set(moe_allowed_runtime/config "runtime/config/;proto/;${moe_below_base}")
set(moe_allowed_runtime/routing "runtime/routing/;runtime/config/;${moe_below_config}")
set(moe_allowed_runtime/device "runtime/device/;runtime/routing/;runtime/config/;${moe_below_config}")
set(moe_allowed_runtime/exchange
    "runtime/exchange/;runtime/device/;runtime/routing/;runtime/config/;${moe_below_config}")
set(moe_allowed_runtime/layer "runtime/layer/;${moe_allowed_runtime/exchange}")
set(moe_allowed_runtime/train "runtime/train/;${moe_allowed_runtime/layer}")
set(moe_allowed_runtime/sim "runtime/sim/;${moe_allowed_runtime/train}")
set(moe_allowed_bench "bench/;runtime/;${moe_below_config}")
set(moe_allowed_launch "launch/;bench/;runtime/;${moe_below_config}")
set(moe_allowed_python "python/;runtime/;${moe_below_config}")
set(moe_folders base experts comm runtime/config runtime/routing runtime/device runtime/exchange
                runtime/layer runtime/train runtime/sim bench launch python)

set(moe_layering_bad "")
set(moe_backend_bad "")
foreach(folder IN LISTS moe_folders)
  file(GLOB_RECURSE files LIST_DIRECTORIES false
       "${ROOT}/${folder}/*.h" "${ROOT}/${folder}/*.cc" "${ROOT}/${folder}/*.cu")
  foreach(f IN LISTS files)
    file(RELATIVE_PATH rel "${ROOT}" "${f}")
    file(STRINGS "${f}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"]")
    foreach(line IN LISTS lines)
      if(folder MATCHES "^runtime/" AND
         line MATCHES "include[ \t]*[<\"]((mpi|nccl)\\.h|comm/(mpi|nccl|loopback)/)")
        string(APPEND moe_backend_bad "\n  ${rel}: ${line}")
        continue()
      endif()
      if(NOT line MATCHES "include[ \t]*\"([^\"]+)\"")
        continue()  # a system header
      endif()
      set(target "${CMAKE_MATCH_1}")
      if(NOT target MATCHES "/")
        continue()  # a header next to the file (generated code)
      endif()
      set(ok FALSE)
      foreach(prefix IN LISTS moe_allowed_${folder})
        string(FIND "${target}" "${prefix}" at)
        if(at EQUAL 0)
          set(ok TRUE)
          break()
        endif()
      endforeach()
      if(NOT ok)
        string(APPEND moe_layering_bad "\n  ${rel}: ${line}  (${folder}/ may include only: "
               "${moe_allowed_${folder}})")
      endif()
    endforeach()
  endforeach()
endforeach()
set(moe_message "")
if(moe_backend_bad)
  string(APPEND moe_message "\nlayering: runtime/ must not name a communicator backend (it is "
         "handed a Communicator, or a factory from comm/world.h):${moe_backend_bad}")
endif()
if(moe_layering_bad)
  string(APPEND moe_message "\nlayering: these includes run up a floor (docs/ARCHITECTURE.md "
         "\"Layout\"):${moe_layering_bad}")
endif()
if(moe_message)
  message(FATAL_ERROR "${moe_message}")
endif()
