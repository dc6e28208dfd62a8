"""Reading what Corosync, Pacemaker and keepalived said, on lines they wrote in the lab.

Every log line and XML document here was captured from the real daemons in a
2-VM lab (Debian bookworm guests: Corosync 3.1.7, Pacemaker 2.1.5, keepalived
2.2.7) on 2026-12-02: the cluster forming, then p1's QEMU killed with SIGKILL.
"""

from __future__ import annotations

import calendar

import pytest

from lockstep.lab.middleware import (
    MiddlewareTotals,
    eth_addresses,
    line_time,
    middleware_events,
    parse_crm_mon,
    parse_middleware_line,
)

# s1's console after p1 was killed (token 1000 ms), Pacemaker's lines kept whole (tab included).
S1_AFTER_KILL = """\
Dec 02 06:00:43.556 info    [KNET  ] link: host: 1 link: 0 is down
Dec 02 06:00:43.564 warning [KNET  ] host: host: 1 has no active links
Dec 02 06:00:43.728 notice  [TOTEM ] Token has not been received in 751 ms␣
Dec 02 06:00:43.976 notice  [TOTEM ] A processor failed, forming new configuration: token timed out (1000ms), waiting 1200ms for consensus.
Dec 02 06:00:45.192 notice  [QUORUM] Sync left[1]: 1
Dec 02 06:00:45.192 notice  [TOTEM ] A new membership (2.d) was formed. Members left: 1
Dec 02 06:00:45.192 notice  [TOTEM ] Failed to receive the leave message. failed: 1
Dec 02 06:00:45.200 notice  [QUORUM] Members[1]: 2
Dec 02 06:00:45.216 s1 pacemaker-controld  [167] (update_peer_state_iter) \tnotice: Node p1 state is now lost | nodeid=1 previous=member source=pcmk__reap_unseen_nodes
Dec 02 06:00:45.236 s1 pacemaker-controld  [167] (abort_transition_graph) \tinfo: Transition 1 aborted: Node failure | source=peer_update_callback:303 complete=true
Wed Dec  2 06:00:45 2026: (VI_1) Entering MASTER STATE
Dec 02 06:00:46.504 s1 pacemaker-schedulerd[166] (recurring_op_for_active) \tinfo: Start 10s-interval monitor for vip on s1
Dec 02 06:00:46.504 s1 pacemaker-schedulerd[166] (log_list_item) \tnotice: Actions: Start      vip     (    s1 )
Dec 02 06:00:46.508 s1 pacemaker-schedulerd[166] (log_list_item) \tnotice: Actions: Start      web     (    s1 )
Dec 02 06:00:46.508 s1 pacemaker-schedulerd[166] (pcmk__log_transition_summary) \tnotice: Calculated transition 2, saving inputs in /var/lib/pacemaker/pengine/pe-input-2.bz2
Dec 02 06:00:48.832 s1 pacemaker-controld  [167] (log_executor_event) \tnotice: Result of start operation for vip on s1: ok | CIB update 63, graph action confirmed; call=10 key=vip_start_0 rc=0
Dec 02 06:00:51.952 s1 pacemaker-controld  [167] (pcmk__execute_graph) \tnotice: Transition 2 (Complete=6, Pending=0, Fired=0, Skipped=0, Incomplete=0, Source=/var/lib/pacemaker/pengine/pe-input-2.bz2): Complete
""".replace("␣", " ")  # Corosync ends its token warning with a space (shown as ␣ above)

# crm_mon --output-as=xml on s1, 7 s after p1 was killed (node_history left out).
CRM_MON_AFTER_KILL = """\
<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">
  <pacemakerd sys_from="pacemakerd" state="running" last_updated="2026-12-02 06:00:50Z"/>
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5-a3f44794f94" name="s1" id="2" with_quorum="true" mixed_version="false"/>
    <last_update time="Wed Dec  2 06:00:50 2026"/>
    <last_change time="Wed Dec  2 05:59:31 2026" user="root" client="cibadmin" origin="p1"/>
    <nodes_configured number="2"/>
    <resources_configured number="2" disabled="0" blocked="0"/>
    <cluster_options stonith-enabled="false" symmetric-cluster="true" no-quorum-policy="stop" maintenance-mode="false" stop-all-resources="false" stonith-timeout-ms="60000" priority-fencing-delay-ms="0"/>
  </summary>
  <nodes>
    <node name="p1" id="1" online="false" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" shutdown="false" expected_up="true" is_dc="false" resources_running="0" type="member"/>
    <node name="s1" id="2" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" feature_set="3.16.1" shutdown="false" expected_up="true" is_dc="true" resources_running="2" type="member"/>
  </nodes>
  <resources>
    <group id="service" number_resources="2" managed="true" disabled="false">
      <resource id="vip" resource_agent="ocf:heartbeat:IPaddr2" role="Started" active="true" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1" pending="Monitoring">
        <node name="s1" id="2" cached="true"/>
      </resource>
      <resource id="web" resource_agent="ocf:heartbeat:anything" role="Starting" active="true" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
        <node name="s1" id="2" cached="true"/>
      </resource>
    </group>
  </resources>
  <status code="0" message="OK"/>
</pacemaker-result>
"""

# crm_mon on p1 while the cluster formed: a DC, both nodes online, no resources yet.
CRM_MON_FORMED = """\
<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">
  <pacemakerd sys_from="pacemakerd" state="running" last_updated="2026-12-02 05:59:28Z"/>
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5-a3f44794f94" name="s1" id="2" with_quorum="true" mixed_version="false"/>
    <nodes_configured number="2"/>
    <resources_configured number="0" disabled="0" blocked="0"/>
  </summary>
  <nodes>
    <node name="p1" id="1" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" feature_set="3.16.1" shutdown="false" expected_up="true" is_dc="false" resources_running="0" type="member"/>
    <node name="s1" id="2" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" feature_set="3.16.1" shutdown="false" expected_up="true" is_dc="true" resources_running="0" type="member"/>
  </nodes>
  <node_history/>
  <status code="0" message="OK"/>
</pacemaker-result>
"""


def test_each_kind_of_event_is_read_from_its_real_line() -> None:
    """A killed node as s1 told it: knet down, token warning and loss, membership, transition, starts, VRRP."""
    events = middleware_events("s1", S1_AFTER_KILL)
    kinds = [(e.kind, e.detail) for e in events]
    assert kinds == [
        ("knet_link_downs", {"host": "1", "link": "0"}),
        ("token_warnings", {"ms": "751"}),
        ("token_losses", {}),
        ("membership_changes", {"ring": "2.d", "rest": "Members left: 1"}),
        ("vrrp_changes", {"instance": "VI_1", "state": "MASTER"}),
        ("resource_moves", {"action": "Start", "resource": "vip", "dst": "s1"}),
        ("resource_moves", {"action": "Start", "resource": "web", "dst": "s1"}),
        ("pacemaker_transitions", {"n": "2"}),
    ]
    assert events[2].line.endswith("waiting 1200ms for consensus.")
    assert all(e.vm == "s1" for e in events)


def test_a_move_names_both_nodes() -> None:
    """The scheduler's Move line (a resource leaving a node that is still up) gives source and target."""
    line = (
        "Dec 02 07:12:03.100 s1 pacemaker-schedulerd[166] (log_list_item) \tnotice: "
        "Actions: Move       vip     ( p1 -> s1 )"
    )
    event = parse_middleware_line("s1", line)
    assert event is not None and event.kind == "resource_moves"
    assert event.detail == {"action": "Move", "resource": "vip", "src": "p1", "dst": "s1"}


@pytest.mark.parametrize(
    "line",
    [
        "Dec 02 06:00:45.236 s1 pacemaker-controld  [167] (abort_transition_graph) \tinfo: "
        "Transition 1 aborted: Node failure | source=peer_update_callback:303 complete=true",
        "Dec 02 06:00:46.504 s1 pacemaker-schedulerd[166] (recurring_op_for_active) \tinfo: "
        "Start 10s-interval monitor for vip on s1",
        "Dec 02 06:00:06.040 p1 pacemaker-controld  [176] (throttle_check_thresholds) \tnotice: "
        "High CPU load detected: 1.110000",
        "Dec 02 05:58:57.452 warning [KNET  ] host: host: 1 has no active links",
        "Keepalived_vrrp[431]: (VI_1) Entering BACKUP STATE (init)",
        '{"t":1796191243.1,"m":1.0,"vm":"s1","r":"abc","n":9,"event":"role","role":"standby"}',
    ],
)
def test_lines_that_are_no_event_are_not_counted(line: str) -> None:
    """Aborted graphs, monitor scheduling, load throttling, knet chatter, syslog copies, agent lines."""
    assert parse_middleware_line("s1", line) is None


def test_keepalived_states_are_read_with_their_instance() -> None:
    """keepalived -l's own line format; the initial BACKUP (init) counts as a state change too."""
    event = parse_middleware_line(
        "p1", "Wed Dec  2 05:59:49 2026: (VI_1) Entering BACKUP STATE (init)"
    )
    assert event is not None and event.detail == {"instance": "VI_1", "state": "BACKUP"}


def test_a_line_written_again_is_counted_once() -> None:
    """A restored guest writes out its saved serial buffer again: a line already seen is no event."""
    token_loss = S1_AFTER_KILL.splitlines()[3]
    assert middleware_events("s1", token_loss + "\n" + token_loss + "\n") == [
        parse_middleware_line("s1", token_loss)
    ]
    assert middleware_events("s1", token_loss + "\r\n", seen=[token_loss]) == []


def test_a_membership_seen_by_every_node_is_one_change() -> None:
    """Both nodes log the ring they formed together; memberships count by ring id."""
    totals = MiddlewareTotals()
    totals.add(
        middleware_events(
            "p1",
            "Dec 02 05:58:58.968 notice  [TOTEM ] A new membership (1.9) was formed. Members joined: 2\n",
        )
    )
    totals.add(
        middleware_events(
            "s1",
            "Dec 02 05:58:58.800 notice  [TOTEM ] A new membership (1.9) was formed. Members joined: 1\n",
        )
    )
    assert totals.count("membership_changes") == 1
    assert len(totals.lines_json()["membership_changes"]) == 2


def test_noticed_counts_what_the_middleware_reacted_to() -> None:
    """Token warnings and knet links down only warn; losses, memberships, transitions, starts, VRRP react."""
    totals = MiddlewareTotals()
    totals.add(middleware_events("s1", S1_AFTER_KILL))
    assert totals.count("token_warnings") == 1 and totals.count("knet_link_downs") == 1
    assert totals.noticed == 1 + 1 + 1 + 2 + 1  # loss, membership, transition, 2 starts, VRRP
    quiet = MiddlewareTotals()
    quiet.add(middleware_events("s1", "\n".join(S1_AFTER_KILL.splitlines()[:3])))
    assert quiet.noticed == 0


def test_crm_mon_after_a_node_was_lost() -> None:
    """s1's view: p1 offline, s1 DC with quorum, the group on s1, web still starting."""
    status = parse_crm_mon(CRM_MON_AFTER_KILL)
    assert status.dc == "s1" and status.quorum
    assert status.nodes == {"p1": False, "s1": True}
    assert status.resources == {"vip": ("s1",), "web": ("s1",)}
    assert status.roles == {"vip": "Started", "web": "Starting"}
    assert not status.formed(["p1", "s1"])
    assert status.group_on(["vip", "web"]) is None  # web is not started yet
    assert status.group_on(["vip"]) == "s1"
    assert status.describe() == (
        "online s1; offline p1; DC s1; vip Started on s1; web Starting on s1"
    )
    assert status.to_json()["resources"]["web"] == {"role": "Starting", "on": ["s1"]}


def test_crm_mon_with_the_cib_root_after_it_gives_the_cib_version() -> None:
    """The view command's second part (the CIB's root element) gives admin_epoch.epoch.num_updates.

    Without it, or with a root element missing a counter, the version is None.
    """
    root = (
        '<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="7"'
        ' num_updates="23" admin_epoch="0" cib-last-written="Wed Dec  2 05:59:31 2026"'
        ' update-origin="p1" have-quorum="1" dc-uuid="2">'
    )
    assert parse_crm_mon(CRM_MON_AFTER_KILL + root + "\n").cib == "0.7.23"
    assert parse_crm_mon(CRM_MON_AFTER_KILL).cib is None
    assert parse_crm_mon(CRM_MON_AFTER_KILL + '<cib epoch="7" admin_epoch="0">').cib is None
    assert parse_crm_mon(CRM_MON_AFTER_KILL + root).to_json()["cib"] == "0.7.23"


def test_crm_mon_of_a_formed_cluster_without_resources() -> None:
    """Both nodes online with a DC: formed; no group runs anywhere yet."""
    status = parse_crm_mon("Some noise before\n" + CRM_MON_FORMED)
    assert status.formed(["p1", "s1"])
    assert status.group_on(["vip", "web"]) is None
    assert status.describe() == "online p1, s1; DC s1"


@pytest.mark.parametrize(
    "text",
    [
        "crm_mon: Error: cluster is not available on this node\n",
        CRM_MON_FORMED[:300],
    ],
)
def test_no_view_is_a_value_error(text: str) -> None:
    """crm_mon that cannot reach the cluster, or XML cut off: ValueError, not a wrong view."""
    with pytest.raises(ValueError):
        parse_crm_mon(text)


def test_addresses_from_ip_addr() -> None:
    """``ip -4 -o addr`` as a guest printed it, the virtual address as a secondary."""
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
        "2: eth0    inet 10.124.0.11/24 scope global eth0\\       valid_lft forever preferred_lft forever\n"
        "2: eth0    inet 10.124.0.100/24 scope global secondary eth0\\       valid_lft forever preferred_lft forever\n"
    )
    assert eth_addresses(text) == ["127.0.0.1", "10.124.0.11", "10.124.0.100"]


def test_line_times_of_every_daemon() -> None:
    """Corosync's and Pacemaker's stamps have no year (the nearest one is taken); keepalived's has."""
    near = calendar.timegm((2026, 12, 2, 6, 0, 0, 0, 0, 0))
    lines = S1_AFTER_KILL.splitlines()
    assert line_time(lines[3], near) == pytest.approx(near + 43.976)
    assert line_time(lines[8], near) == pytest.approx(near + 45.216)
    assert line_time(lines[10], near) == near + 45
    assert line_time("Keepalived_vrrp[431]: (VI_1) Entering MASTER STATE", near) is None
    new_year = calendar.timegm((2027, 1, 1, 0, 0, 1, 0, 0, 0))
    assert line_time("Dec 31 23:59:59.500 notice  [TOTEM ] x", new_year) == pytest.approx(
        new_year - 1.5
    )
