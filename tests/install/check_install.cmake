# Installs the project into a scratch prefix, builds examples/ out of tree against it with
# find_package(moe_runtime) only, and runs them: the layer example, and the expert-parallel
# example under `mpiexec -n 2` when MPI is built (else on 2 loopback ranks); with -DPYTHON the
# Python package from the prefix alone.
#   cmake -DBUILD=<build dir> -DSOURCE=<source dir> -DWORK=<scratch dir> -DGENERATOR=<generator>
#         [-DMPIEXEC=<mpiexec>] [-DCXX_FLAGS=...] [-DLINKER_FLAGS=...]
#         [-DPYTHON=<interpreter> -DPYTHON_DIR=<package dir under the prefix>] -P check_install.cmake
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "${what}:\n${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc})")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK}")
set(prefix "${WORK}/prefix")
run("install" ${CMAKE_COMMAND} --install "${BUILD}" --prefix "${prefix}")
foreach(f include/moe_runtime/runtime/layer/moe_layer.h include/moe_runtime/comm/world.h
          include/moe_runtime/proto/moe_config.pb.h lib/cmake/moe_runtime/moe_runtimeConfig.cmake
          lib/cmake/moe_runtime/moe_runtimeConfigVersion.cmake)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "the install has no ${f}")
  endif()
endforeach()
run("configure the examples" ${CMAKE_COMMAND} -S "${SOURCE}/examples" -B "${WORK}/examples"
    -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${prefix}"
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${LINKER_FLAGS}")
run("build the examples" ${CMAKE_COMMAND} --build "${WORK}/examples" -j 2)

run("layer example" "${WORK}/examples/layer_forward_backward/layer_forward_backward")
if(NOT run_output MATCHES "gradient check: .* OK")
  message(FATAL_ERROR "the layer example did not report its gradient check")
endif()

set(ep "${WORK}/examples/expert_parallel/expert_parallel")
if(MPIEXEC)
  set(ENV{OMPI_ALLOW_RUN_AS_ROOT} 1)
  set(ENV{OMPI_ALLOW_RUN_AS_ROOT_CONFIRM} 1)
  set(ENV{OMPI_MCA_rmaps_base_oversubscribe} 1)
  set(ENV{ASAN_OPTIONS} detect_leaks=0)  # Open MPI's own allocations
  run("mpiexec -n 2 expert_parallel" "${MPIEXEC}" -n 2 "${ep}")
else()
  run("expert_parallel on 2 loopback ranks" "${ep}" --backend loopback --ranks 2)
endif()
foreach(r 0 1)
  if(NOT run_output MATCHES "rank ${r}/2: [^\n]* matches the 1-rank layer")
    message(FATAL_ERROR "the expert-parallel example printed no matching line for rank ${r}")
  endif()
endforeach()

# The Python package, from the install prefix only (not the build tree): a layer call and a few
# steps of the PyTorch example.
if(PYTHON)
  set(ENV{PYTHONPATH} "${prefix}/${PYTHON_DIR}")
  file(WRITE "${WORK}/import_check.py" [=[
import numpy
import moe_runtime
print(moe_runtime.__file__)
layer = moe_runtime.Layer("moe { model_dim: 4 num_experts: 2 expert { hidden_dim: 8 } router { top_k: 1 } }")
y, routing = layer.forward(numpy.ones((3, 4), numpy.float32))
print("installed layer: y", y.shape)
]=])
  run("import the installed moe_runtime" "${PYTHON}" "${WORK}/import_check.py")
  if(NOT run_output MATCHES "^${prefix}/")
    message(FATAL_ERROR "moe_runtime was imported from outside the install prefix: ${run_output}")
  endif()
  run("train_tiny.py from the installed package" "${PYTHON}" "${SOURCE}/examples/python/train_tiny.py"
      --steps 3 --log-every 1)
endif()
