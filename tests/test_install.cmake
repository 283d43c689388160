# test_install: installs this build tree into a fresh prefix under the build
# folder, then configures, builds and runs tests/consumer/, an outside
# project that finds the package with find_package(kvevict CONFIG). The work
# is a CMake script (run with cmake -P), so it needs no shell, and it
# downloads nothing.
add_test(NAME test_install
  COMMAND ${CMAKE_COMMAND}
    "-DKVEVICT_BINARY_DIR=${CMAKE_BINARY_DIR}"
    "-DCONSUMER_SOURCE_DIR=${CMAKE_CURRENT_LIST_DIR}/consumer"
    "-DWORK_DIR=${CMAKE_BINARY_DIR}/install-test"
    "-DCONFIG=$<CONFIG>"
    "-DGENERATOR=${CMAKE_GENERATOR}"
    "-DCXX_COMPILER=${CMAKE_CXX_COMPILER}"
    "-DEIGEN3_DIR=${Eigen3_DIR}"
    -P ${CMAKE_CURRENT_LIST_DIR}/consumer/check_install.cmake)
# Configuring and compiling the consumer takes about 20 s on one core.
set_tests_properties(test_install PROPERTIES TIMEOUT 600 LABELS install)
