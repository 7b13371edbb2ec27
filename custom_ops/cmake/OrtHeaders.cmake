# Locate the onnxruntime C/C++ API headers (they are not part of the onnxruntime Python wheel).
#
# 1. ONNXRUNTIME_INCLUDE_DIR (CMake cache variable or environment variable), if set.
# 2. A per-user cache: ${XDG_CACHE_HOME:-~/.cache}/toptheta-export/ort-headers-<ver>.
# 3. Otherwise Debian trixie's libonnxruntime-dev package is downloaded with a private apt state
#    (the system's apt lists, cache and sources are not touched), unpacked with dpkg-deb, and its
#    headers are copied into the cache of step 2.
# Sets ORT_INCLUDE_DIR (the folder holding onnxruntime_c_api.h) or stops with one message.

set(TOPTHETA_ORT_HEADERS_VERSION "1.21" CACHE STRING "onnxruntime header version fetched from Debian trixie")
set(TOPTHETA_ORT_DEBIAN_SOURCE "deb http://deb.debian.org/debian trixie main"
    CACHE STRING "apt source line that provides libonnxruntime-dev")

set(_ort_fix_hint "set ONNXRUNTIME_INCLUDE_DIR (CMake -D or environment) to a folder holding onnxruntime_c_api.h, e.g. the include/ folder of an onnxruntime release archive (API version >= 21)")

function(_ort_fail why)
  message(FATAL_ERROR "toptheta: onnxruntime headers not found (${why}): ${_ort_fix_hint}")
endfunction()

# Runs one command; on failure returns its output in OUT_ERR (empty on success).
function(_ort_run out_err)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    set(${out_err} "" PARENT_SCOPE)
  else()
    # apt prints warnings (W:) before the error (E:): report the first error line.
    string(REGEX MATCH "E: [^\n]*" eline "${err}")
    if(NOT eline)
      string(STRIP "${err}" eline)
      string(REGEX REPLACE "\n.*" "" eline "${eline}")
    endif()
    get_filename_component(tool "${ARGV1}" NAME)
    set(${out_err} "'${tool} ${ARGV2} ...' failed: ${eline}" PARENT_SCOPE)
  endif()
endfunction()

# Downloads libonnxruntime-dev and copies its headers to DEST. Sets ERR on failure.
function(_ort_fetch_debian dest err_var)
  find_program(_APT_GET apt-get)
  find_program(_DPKG_DEB dpkg-deb)
  if(NOT _APT_GET OR NOT _DPKG_DEB)
    set(${err_var} "apt-get/dpkg-deb not available to fetch Debian's libonnxruntime-dev" PARENT_SCOPE)
    return()
  endif()
  set(work "${CMAKE_BINARY_DIR}/_ort_headers_fetch")
  file(REMOVE_RECURSE "${work}")
  file(MAKE_DIRECTORY "${work}/lists/partial" "${work}/cache/archives/partial" "${work}/prefs.d" "${work}/deb")
  file(WRITE "${work}/sources.list" "${TOPTHETA_ORT_DEBIAN_SOURCE}\n")
  set(opts
    -o "Dir::Etc::SourceList=${work}/sources.list"
    -o "Dir::Etc::SourceParts=${work}/none"
    -o "Dir::State::Lists=${work}/lists"
    -o "Dir::Cache=${work}/cache"
    -o "Dir::Etc::Preferences=${work}/none"
    -o "Dir::Etc::PreferencesParts=${work}/prefs.d"
    -o "Debug::NoLocking=1"
    -o "Acquire::Retries=2")
  if("$ENV{USER}" STREQUAL "root" OR "$ENV{HOME}" STREQUAL "/root")
    list(APPEND opts -o "APT::Sandbox::User=root")
  endif()
  message(STATUS "toptheta: fetching onnxruntime ${TOPTHETA_ORT_HEADERS_VERSION} headers (Debian libonnxruntime-dev)")
  _ort_run(e ${_APT_GET} update -qq ${opts})
  if(e)
    set(${err_var} "${e}" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND ${_APT_GET} download -qq ${opts} libonnxruntime-dev
                  WORKING_DIRECTORY "${work}/deb" RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_QUIET)
  file(GLOB debs "${work}/deb/libonnxruntime-dev_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    string(REGEX MATCH "E: [^\n]*" eline "${err}")
    set(${err_var} "apt-get download libonnxruntime-dev failed: ${eline}" PARENT_SCOPE)
    return()
  endif()
  list(GET debs 0 deb)
  execute_process(COMMAND ${_DPKG_DEB} -f "${deb}" Version OUTPUT_VARIABLE ver OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT ver MATCHES "^${TOPTHETA_ORT_HEADERS_VERSION}")
    set(${err_var} "Debian ships libonnxruntime-dev ${ver}, expected ${TOPTHETA_ORT_HEADERS_VERSION}.x" PARENT_SCOPE)
    return()
  endif()
  _ort_run(e ${_DPKG_DEB} -x "${deb}" "${work}/x")  # unpack only: nothing is installed
  if(e)
    set(${err_var} "${e}" PARENT_SCOPE)
    return()
  endif()
  # Debian puts the headers in /usr/include/onnxruntime/ (flat, plus core/providers/).
  file(GLOB_RECURSE found "${work}/x/usr/include/onnxruntime_c_api.h")
  if(NOT found)
    set(${err_var} "libonnxruntime-dev ${ver} holds no onnxruntime_c_api.h" PARENT_SCOPE)
    return()
  endif()
  list(GET found 0 capi)
  get_filename_component(src "${capi}" DIRECTORY)
  # Copy to a temporary sibling and rename, so an interrupted build never leaves a partial cache.
  string(RANDOM LENGTH 8 tag)
  set(tmp "${dest}.tmp-${tag}")
  file(REMOVE_RECURSE "${tmp}")
  file(MAKE_DIRECTORY "${tmp}")
  file(COPY "${src}/" DESTINATION "${tmp}/include")
  file(WRITE "${tmp}/VERSION" "libonnxruntime-dev ${ver}\n")
  file(REMOVE_RECURSE "${dest}")
  file(RENAME "${tmp}" "${dest}")
  file(REMOVE_RECURSE "${work}")
  set(${err_var} "" PARENT_SCOPE)
endfunction()

function(toptheta_find_ort_headers)
  set(dir "${ONNXRUNTIME_INCLUDE_DIR}")
  if(NOT dir AND DEFINED ENV{ONNXRUNTIME_INCLUDE_DIR})
    set(dir "$ENV{ONNXRUNTIME_INCLUDE_DIR}")
  endif()
  if(dir)
    if(NOT EXISTS "${dir}/onnxruntime_c_api.h")
      _ort_fail("ONNXRUNTIME_INCLUDE_DIR=${dir} holds no onnxruntime_c_api.h")
    endif()
    set(ORT_INCLUDE_DIR "${dir}" PARENT_SCOPE)
    message(STATUS "toptheta: onnxruntime headers from ONNXRUNTIME_INCLUDE_DIR=${dir}")
    return()
  endif()

  if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(cache_root "$ENV{XDG_CACHE_HOME}")
  elseif(DEFINED ENV{HOME})
    set(cache_root "$ENV{HOME}/.cache")
  else()
    set(cache_root "${CMAKE_BINARY_DIR}/.cache")
  endif()
  set(cached "${cache_root}/toptheta-export/ort-headers-${TOPTHETA_ORT_HEADERS_VERSION}")
  if(NOT EXISTS "${cached}/include/onnxruntime_c_api.h")
    _ort_fetch_debian("${cached}" err)
    if(err)
      _ort_fail("${err}")
    endif()
  endif()
  set(ORT_INCLUDE_DIR "${cached}/include" PARENT_SCOPE)
  message(STATUS "toptheta: onnxruntime headers from ${cached}/include")
endfunction()
