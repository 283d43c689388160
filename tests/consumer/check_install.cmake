# The install test, run with cmake -P. Installs the kvevict build tree into
# a fresh prefix, configures and builds this folder's consumer project
# against that prefix, runs the consumer and compares its output.
#
# Arguments (-D):
#   KVEVICT_BINARY_DIR   kvevict build tree to install (required)
#   CONSUMER_SOURCE_DIR  tests/consumer (required)
#   WORK_DIR             scratch folder, removed and recreated (required)
#   CONFIG               build configuration, or empty for none
#   GENERATOR            CMake generator for the consumer build
#   CXX_COMPILER         C++ compiler for the consumer build
#   EIGEN3_DIR           Eigen3_DIR that kvevict was configured with
cmake_minimum_required(VERSION 3.25)

foreach(name IN ITEMS KVEVICT_BINARY_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if("${${name}}" STREQUAL "")
    message(FATAL_ERROR "check_install.cmake: ${name} is missing; pass -D${name}=<path>")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(consumer_build "${WORK_DIR}/consumer-build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# Runs one command and stops the test with its output when it fails. The
# combined output is returned in step_output.
function(run_step description)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${description} failed (exit status ${result}):\n${output}")
  endif()
  set(step_output "${output}" PARENT_SCOPE)
endfunction()

set(config_arguments "")
if(NOT "${CONFIG}" STREQUAL "")
  set(config_arguments --config "${CONFIG}")
endif()

run_step("cmake --install of ${KVEVICT_BINARY_DIR}"
  "${CMAKE_COMMAND}" --install "${KVEVICT_BINARY_DIR}" --prefix "${prefix}" ${config_arguments})

set(configure_arguments -S "${CONSUMER_SOURCE_DIR}" -B "${consumer_build}" "-DCMAKE_PREFIX_PATH=${prefix}")
if(NOT "${GENERATOR}" STREQUAL "")
  list(APPEND configure_arguments -G "${GENERATOR}")
endif()
if(NOT "${CXX_COMPILER}" STREQUAL "")
  list(APPEND configure_arguments "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(NOT "${EIGEN3_DIR}" STREQUAL "")
  list(APPEND configure_arguments "-DEigen3_DIR=${EIGEN3_DIR}")
endif()
if(NOT "${CONFIG}" STREQUAL "")
  list(APPEND configure_arguments "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
run_step("configuring the consumer" "${CMAKE_COMMAND}" ${configure_arguments})

# The package must come from the fresh prefix, not from another install
# that happens to be on the search path.
file(STRINGS "${consumer_build}/CMakeCache.txt" package_dir REGEX "^kvevict_DIR:")
string(FIND "${package_dir}" "${prefix}/" prefix_at)
if(prefix_at EQUAL -1)
  message(FATAL_ERROR "the consumer found kvevict outside the test prefix ${prefix}: ${package_dir}")
endif()

run_step("building the consumer" "${CMAKE_COMMAND}" --build "${consumer_build}" ${config_arguments})

# Single-configuration generators put the program in the build folder,
# multi-configuration ones in a folder named after the configuration.
set(program "")
foreach(candidate IN ITEMS
    "${consumer_build}/consumer" "${consumer_build}/consumer.exe"
    "${consumer_build}/${CONFIG}/consumer" "${consumer_build}/${CONFIG}/consumer.exe")
  if(EXISTS "${candidate}" AND NOT IS_DIRECTORY "${candidate}")
    set(program "${candidate}")
    break()
  endif()
endforeach()
if(program STREQUAL "")
  message(FATAL_ERROR "the consumer program was not found in ${consumer_build}")
endif()

run_step("running the consumer" "${program}")
set(expected "head 0 kept positions: 0 1 2 3 8 9 10 11\nhead 1 kept positions: 0 1 2 3 8 9 10 11\n")
if(NOT step_output STREQUAL expected)
  message(FATAL_ERROR "the consumer printed:\n${step_output}\nexpected:\n${expected}")
endif()
message(STATUS "installed package works: ${package_dir}")
